"""installers/install.sh, driven as a subprocess.

Detection is exercised for real: fake `nvidia-smi`, `rocminfo`, `uname` and `systemctl` scripts are
put first on PATH, and LOCALSERVE_INSTALL_SYSROOT points the /proc, /dev and /opt/rocm probes at a
temporary tree. Dry runs check the plan (accelerator, extra, torch pin, pip indexes); one real
install into a temporary prefix checks the venv, the command link, the service unit, a second run
and --uninstall.
"""

from __future__ import annotations

import os
import json
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "installers" / "install.sh"
# The real install builds this tree; override to try the installer against another checkout.
SOURCE = Path(os.environ.get("LOCALSERVE_INSTALLER_TEST_SOURCE", REPO))

pytestmark = pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="POSIX installer")


def fake_bin(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def run_installer(
    *args: str,
    home: Path,
    fake_path: Path | None = None,
    sysroot: Path | None = None,
    extra_env: dict[str, str | None] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The real pip cache keeps the real install fast although HOME is temporary.
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    env["HOME"] = str(home)
    env.pop("XDG_DATA_HOME", None)
    env.pop("XDG_CONFIG_HOME", None)
    env["LOCALSERVE_INSTALL_SYSROOT"] = str(sysroot if sysroot is not None else home / "sysroot")
    if fake_path is not None:
        env["PATH"] = f"{fake_path}{os.pathsep}{env['PATH']}"
    for key, value in (extra_env or {}).items():  # None removes the variable
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"install.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def plan_line(out: str, key: str) -> str:
    match = re.search(rf"^==> {key}: (.*)$", out, re.M)
    assert match, f"no '{key}:' line in:\n{out}"
    return match.group(1)


def pip_commands(out: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ") and " -m pip install" in line]


def index_urls(out: str) -> set[str]:
    urls = set()
    for cmd in pip_commands(out):
        for flag in ("--index-url", "--extra-index-url"):
            if flag in cmd:
                urls.add(cmd[cmd.index(flag) + 1])
    return urls


def assert_no_cuda(out: str) -> None:
    for cmd in pip_commands(out):
        torch = [w for w in cmd if w.startswith("torch==")]
        assert all("+cu" not in w for w in torch), cmd
    assert not any("/whl/cu" in url for url in index_urls(out)), index_urls(out)
    assert "[cuda" not in out and ",cuda" not in out
    assert "nvidia-" not in out


def host_has_gpu() -> bool:
    return bool(shutil.which("nvidia-smi") or shutil.which("rocminfo") or Path("/dev/kfd").exists()
                or Path("/proc/driver/nvidia").exists() or sys.platform == "darwin")


# ---------------------------------------------------------------------------------------------
# Dry runs


def test_help_lists_every_flag(tmp_path):
    out = run_installer("--help", home=tmp_path).stdout
    for flag in ("--prefix", "--bin-dir", "--source", "--gpu", "--torch-version", "--torch-index",
                 "--python", "--service", "--host", "--port", "--model", "--backend", "--uninstall",
                 "--dry-run", "--help"):
        assert flag in out


def test_unknown_flag_is_an_error(tmp_path):
    proc = run_installer("--frobnicate", home=tmp_path, check=False)
    assert proc.returncode != 0
    assert "unknown option: --frobnicate" in proc.stderr


@pytest.mark.skipif(host_has_gpu(), reason="this host has a GPU (or is a Mac); the test is for CPU hosts")
def test_dry_run_on_this_machine_picks_cpu_torch(tmp_path):
    proc = run_installer("--dry-run", home=tmp_path)
    out = proc.stdout
    assert plan_line(out, "accelerator").startswith("cpu")
    assert plan_line(out, "extra") == "localserve[cpu]; torch: torch==2.13.0+cpu"
    assert plan_line(out, "venv") == str(tmp_path / ".local/share/localserve/venv")
    assert plan_line(out, "source") == str(REPO)  # run from a checkout: that checkout
    assert_no_cuda(out)
    cmds = pip_commands(out)
    assert cmds[0][-1] == "torch==2.13.0+cpu"
    assert cmds[1][-1].endswith("/src[cpu]")
    # Either the user's pip config supplies the CPU build (this machine: /opt/wheels) or the
    # PyTorch CPU index is added; never anything else.
    if "available through your pip configuration" in out:
        assert index_urls(out) == set()
    else:
        assert index_urls(out) == {"https://download.pytorch.org/whl/cpu"}
    # A dry run changes nothing.
    assert not (tmp_path / ".local").exists()


def test_cpu_index_is_added_when_pip_config_has_no_cpu_torch(tmp_path):
    # No config files, no find-links, no index: the probe cannot find the CPU build.
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": None, "PIP_NO_INDEX": "1"}
    out = run_installer("--dry-run", "--gpu", "cpu", home=tmp_path, extra_env=env).stdout
    assert "adding the PyTorch CPU index" in out
    assert index_urls(out) == {"https://download.pytorch.org/whl/cpu"}
    assert pip_commands(out)[0][-1] == "torch==2.13.0+cpu"
    assert_no_cuda(out)


def test_fake_nvidia_smi_selects_cuda(tmp_path):
    fake = tmp_path / "fake"
    fake_bin(fake, "nvidia-smi", 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0123)"\n')
    out = run_installer("--dry-run", home=tmp_path, fake_path=fake).stdout
    assert plan_line(out, "accelerator").startswith("nvidia (nvidia-smi: GPU 0: NVIDIA H100")
    assert plan_line(out, "extra") == "localserve[cuda]; torch: torch==2.13.0"
    assert index_urls(out) == set()  # PyPI's Linux torch is the CUDA build
    assert pip_commands(out)[1][-1].endswith("[cuda]")


def test_nvidia_smi_without_a_gpu_means_cpu(tmp_path):
    fake = tmp_path / "fake"
    fake_bin(fake, "nvidia-smi", 'echo "No devices were found"\nexit 6\n')
    out = run_installer("--dry-run", home=tmp_path, fake_path=fake).stdout
    assert plan_line(out, "accelerator").startswith("cpu")
    assert_no_cuda(out)


def test_proc_driver_nvidia_selects_cuda(tmp_path):
    sysroot = tmp_path / "root"
    (sysroot / "proc/driver/nvidia/gpus/0000:01:00.0").mkdir(parents=True)
    out = run_installer("--dry-run", home=tmp_path, sysroot=sysroot).stdout
    assert plan_line(out, "accelerator").startswith("nvidia")
    assert "localserve[cuda]" in out


def test_fake_rocminfo_selects_rocm(tmp_path):
    fake = tmp_path / "fake"
    fake_bin(fake, "rocminfo", "printf '  Name:   AMD EPYC 7763\\n  Name:   gfx90a\\n'\n")
    out = run_installer("--dry-run", home=tmp_path, fake_path=fake).stdout
    assert plan_line(out, "accelerator") == "amd (rocminfo: gfx90a)"
    assert plan_line(out, "extra") == "localserve[rocm]; torch: torch==2.13.0+rocm7.1"
    assert index_urls(out) == {"https://download.pytorch.org/whl/rocm7.1"}
    assert_no_cuda(out)


def test_dev_kfd_and_rocm_version_select_matching_rocm_index(tmp_path):
    sysroot = tmp_path / "root"
    (sysroot / "dev").mkdir(parents=True)
    (sysroot / "dev/kfd").touch()
    (sysroot / "opt/rocm/.info").mkdir(parents=True)
    (sysroot / "opt/rocm/.info/version").write_text("6.4.1-120\n")
    out = run_installer("--dry-run", home=tmp_path, sysroot=sysroot).stdout
    assert plan_line(out, "accelerator").startswith("amd (AMD GPU driver")
    assert pip_commands(out)[0][-1] == "torch==2.13.0+rocm6.4"
    assert index_urls(out) == {"https://download.pytorch.org/whl/rocm6.4"}
    assert_no_cuda(out)


def test_fake_apple_silicon_selects_mlx_and_launchd_agent(tmp_path):
    fake = tmp_path / "fake"
    fake_bin(fake, "uname", 'case "$1" in -m) echo arm64 ;; *) echo Darwin ;; esac\n')
    out = run_installer("--dry-run", "--service", "--port", "9123", home=tmp_path, fake_path=fake).stdout
    assert plan_line(out, "accelerator").startswith("apple")
    assert plan_line(out, "extra") == "localserve[mlx,cpu]; torch: torch==2.13.0"
    assert index_urls(out) == set()
    assert_no_cuda(out)
    venv = tmp_path / "Library/Application Support/localserve/venv"
    assert plan_line(out, "venv") == str(venv)
    agent = tmp_path / "Library/LaunchAgents/io.localserve.server.plist"
    assert plan_line(out, "service") == str(agent)
    xml = out[out.index("<?xml"):out.index("</plist>") + len("</plist>")]
    plist = plistlib.loads(xml.encode())
    assert plist["Label"] == "io.localserve.server"
    assert plist["ProgramArguments"] == [str(venv / "bin/localserve"), "up", "--host", "127.0.0.1", "--port", "9123"]
    assert plist["RunAtLoad"] is True
    assert not agent.exists()


def test_intel_mac_is_cpu_without_linux_cpu_tag(tmp_path):
    fake = tmp_path / "fake"
    fake_bin(fake, "uname", 'case "$1" in -m) echo x86_64 ;; *) echo Darwin ;; esac\n')
    out = run_installer("--dry-run", home=tmp_path, fake_path=fake).stdout
    assert plan_line(out, "extra") == "localserve[cpu]; torch: torch==2.13.0"
    assert_no_cuda(out)


def test_gpu_flag_overrides_detection(tmp_path):
    fake = tmp_path / "fake"
    fake_bin(fake, "nvidia-smi", 'echo "GPU 0: NVIDIA A100"\n')
    out = run_installer("--dry-run", "--gpu", "cpu", home=tmp_path, fake_path=fake).stdout
    assert plan_line(out, "accelerator") == "cpu (forced with --gpu)"
    assert_no_cuda(out)


def test_systemd_unit_dry_run_quotes_exec_start(tmp_path):
    xdg = tmp_path / "xdgconf"
    out = run_installer("--dry-run", "--service", "--host", "0.0.0.0", "--port", "8080", "--backend", "cpu",
                        "--model", "my model%.gguf", home=tmp_path, extra_env={"XDG_CONFIG_HOME": str(xdg)}).stdout
    unit = xdg / "systemd/user/localserve.service"
    assert plan_line(out, "service") == str(unit)
    exec_start = re.search(r"^ExecStart=(.*)$", out, re.M).group(1)
    venv = tmp_path / ".local/share/localserve/venv"
    assert exec_start == f'{venv}/bin/localserve up "my model%%.gguf" --host 0.0.0.0 --port 8080 --backend cpu'
    assert not unit.exists()


def test_piped_into_sh_installs_from_pypi(tmp_path):
    # `curl ... | sh -s -- ARGS`: no checkout to find, so the PyPI package is the default source.
    env = dict(os.environ, HOME=str(tmp_path), LOCALSERVE_INSTALL_SYSROOT=str(tmp_path / "root"))
    proc = subprocess.run(["sh", "-s", "--", "--dry-run", "--gpu", "cpu"], input=SCRIPT.read_text(), env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert plan_line(proc.stdout, "source") == "pypi"
    assert pip_commands(proc.stdout)[1][-1] == "localserve[cpu]"


def test_url_source_becomes_a_direct_reference(tmp_path):
    out = run_installer("--dry-run", "--gpu", "nvidia", "--source", "https://github.com/example/localserve.git",
                        home=tmp_path).stdout
    assert pip_commands(out)[1][-1] == "localserve[cuda] @ git+https://github.com/example/localserve.git"


def test_refuses_a_prefix_it_did_not_create(tmp_path):
    prefix = tmp_path / "precious"
    prefix.mkdir()
    (prefix / "data.txt").write_text("keep me")
    for args in (("--dry-run",), ("--uninstall",)):
        proc = run_installer(*args, "--prefix", str(prefix), home=tmp_path, check=False)
        assert proc.returncode != 0
        assert "not a" in proc.stderr and "venv made by this installer" in proc.stderr
    assert (prefix / "data.txt").read_text() == "keep me"
    proc = run_installer("--uninstall", "--prefix", str(tmp_path), home=tmp_path, check=False)
    assert proc.returncode != 0 and "must be a directory of its own" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Real install


def installed_dists(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.slow  # pip installs torch and the package into a fresh venv: ~1 min idle, ~3 min on a busy 2-core box
def test_real_install_twice_with_service_then_uninstall(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    prefix = tmp_path / "venv"
    bin_dir = tmp_path / "bin"
    fake = tmp_path / "fake"
    log = tmp_path / "systemctl.log"
    # systemctl --user answers only when FAKE_SYSTEMD_USER=1; every call is logged.
    fake_bin(fake, "systemctl", f'echo "$*" >> "{log}"\n'
             'if [ "${FAKE_SYSTEMD_USER:-0}" != 1 ]; then echo "Failed to connect to bus" >&2; exit 1; fi\n')
    args = ("--prefix", str(prefix), "--bin-dir", str(bin_dir), "--source", str(SOURCE),
            "--service", "--port", "8123")
    unit = home / ".config/systemd/user/localserve.service"

    first = run_installer(*args, home=home, fake_path=fake)
    assert "systemctl --user is not usable here" in first.stdout
    assert "--user show-environment" in log.read_text()
    assert "enable" not in log.read_text()
    exe = prefix / "bin/localserve"
    help_run = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0, help_run.stderr
    assert "usage: localserve" in help_run.stdout
    assert subprocess.run([str(exe), "up", "--help"], capture_output=True).returncode == 0
    link = bin_dir / "localserve"
    assert link.is_symlink() and Path(os.readlink(link)) == exe
    assert re.search(r"^ExecStart=(.*)$", unit.read_text(), re.M).group(1) == f"{exe} up --host 127.0.0.1 --port 8123"
    dists = installed_dists(prefix / "bin/python")
    assert dists["torch"].startswith("2.13.0")
    if not host_has_gpu():
        assert dists["torch"].endswith("+cpu")
        assert not [name for name in dists if name.startswith("nvidia-")]
    unit_before = unit.read_text()

    second = run_installer(*args, home=home, fake_path=fake, extra_env={"FAKE_SYSTEMD_USER": "1"})
    assert "reusing the existing venv" in second.stdout
    calls = log.read_text()
    for call in ("--user daemon-reload", "--user enable localserve.service", "--user restart localserve.service"):
        assert call in calls
    assert subprocess.run([str(exe), "--help"], capture_output=True).returncode == 0
    assert unit.read_text() == unit_before
    assert Path(os.readlink(link)) == exe

    gone = run_installer("--uninstall", "--prefix", str(prefix), home=home, fake_path=fake,
                         extra_env={"FAKE_SYSTEMD_USER": "1"})
    assert "localserve uninstalled" in gone.stdout
    assert "--user disable --now localserve.service" in log.read_text()
    assert not prefix.exists()
    assert not link.exists() and not link.is_symlink()
    assert not bin_dir.exists()  # the installer created it, so it goes too
    assert not unit.exists()
    # Uninstalling again is a no-op, not an error.
    assert "nothing installed" in run_installer("--uninstall", "--prefix", str(prefix), home=home).stdout
