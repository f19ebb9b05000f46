"""The real coding-agent CLIs, installed once per user and pinned version under
`$XDG_CACHE_HOME/localserve/test-clients/<name>-<version>/` (or `$LOCALSERVE_TEST_CLIENTS_DIR`).
A lock file keeps parallel test processes from installing the same client twice; a stamp file,
written last, marks a finished install (a half-finished one is wiped and redone)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STAMP = ".installed"


class ClientInstallError(RuntimeError):
    pass


@dataclass(frozen=True)
class ClientSpec:
    name: str  # the cache folder's stem
    package: str  # npm or PyPI name
    version: str  # the pin
    kind: str  # "npm" or "pypi"
    executable: str  # the command it installs

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.version}"


CLAUDE_CODE = ClientSpec("claude-code", "@anthropic-ai/claude-code", "2.1.337", "npm", "claude")
CODEX = ClientSpec("codex", "@openai/codex", "0.171.0", "npm", "codex")
AIDER = ClientSpec("aider", "aider-chat", "0.86.2", "pypi", "aider")  # its own venv: its pins clash with ours


def cache_root() -> Path:
    if explicit := os.environ.get("LOCALSERVE_TEST_CLIENTS_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "localserve" / "test-clients"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def executable_path(spec: ClientSpec, root: Path | None = None) -> Path:
    folder = (root or cache_root()) / spec.folder
    if spec.kind == "npm":
        return folder / "node_modules" / ".bin" / spec.executable
    return folder / "venv" / "bin" / spec.executable


def ensure_installed(spec: ClientSpec, root: Path | None = None, timeout: float = 900) -> Path:
    """The client's executable, installing it first if this user has no finished install of the
    pinned version. Raises ClientInstallError with the installer's output when that fails."""
    root = root or cache_root()
    folder, exe = root / spec.folder, executable_path(spec, root)
    with _locked(root / f"{spec.folder}.lock"):
        if (folder / STAMP).exists() and exe.exists():
            return exe
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        steps = _npm_steps(spec, folder) if spec.kind == "npm" else _pypi_steps(spec, folder)
        for argv in steps:
            _run(spec, argv, folder, timeout)
        _check_version(spec, exe)
        (folder / STAMP).write_text(f"{spec.package}=={spec.version}\n")
    return exe


def _npm_steps(spec: ClientSpec, folder: Path) -> list[list[str]]:
    npm = shutil.which("npm")
    if npm is None:
        raise ClientInstallError(f"installing {spec.package}@{spec.version}: npm is not on PATH (install Node.js)")
    # an exact pin in package.json; the native binary comes from the package's optional
    # per-platform dependency, so npm's skipped postinstall scripts do not matter
    (folder / "package.json").write_text(json.dumps(
        {"name": f"localserve-test-{spec.name}", "private": True, "dependencies": {spec.package: spec.version}}))
    return [[npm, "install", "--no-audit", "--no-fund", "--no-update-notifier"]]


def _pypi_steps(spec: ClientSpec, folder: Path) -> list[list[str]]:
    venv = folder / "venv"
    return [[sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
             f"{spec.package}=={spec.version}"]]


def _run(spec: ClientSpec, argv: list[str], cwd: Path, timeout: float) -> None:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ClientInstallError(f"installing {spec.package}=={spec.version}: {' '.join(argv)} ran over "
                                 f"{timeout:.0f} s (is the package registry reachable?)") from exc
    if p.returncode != 0:
        raise ClientInstallError(
            f"installing {spec.package}=={spec.version} into {cwd} failed (is the package registry "
            f"reachable?): {' '.join(argv)} exited {p.returncode}\n{(p.stdout + p.stderr)[-3000:]}")


def _check_version(spec: ClientSpec, exe: Path) -> None:
    if not exe.exists():
        raise ClientInstallError(f"installing {spec.package}=={spec.version}: {exe} is missing afterwards")
    with tempfile.TemporaryDirectory() as home:  # --version must not write into the user's home
        p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HOME": home})
    if spec.version not in p.stdout + p.stderr:
        raise ClientInstallError(f"{exe} --version says {(p.stdout + p.stderr).strip()!r}, not {spec.version}")
