"""localserve.envs: every LOCALSERVE_* knob declared once, read there and only there."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from localserve import envs
from localserve.envs import KNOBS, EnvError

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("localserve", "backends", "tui")  # what ships (benchmarks/scripts/ and tests/ do not)
# localserve/server/settings.py reads the `localserve up` variables too, from the mapping it is
# given and by the names in envs.UP_SETTINGS: no literal there, nothing more to allow
ALLOWED = {REPO / "localserve" / "envs.py"}
NAME = re.compile(r"LOCALSERVE_[A-Z0-9_]*[A-Z0-9]")


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def _names_environ(node: ast.AST) -> bool:
    """os.environ, environ, os.getenv, getenv."""
    if isinstance(node, ast.Attribute):
        return node.attr in ("environ", "getenv")
    return isinstance(node, ast.Name) and node.id in ("environ", "getenv")


def _mentions_knob(node: ast.AST | None) -> bool:
    """A "LOCALSERVE_..." string, also inside an f-string or a concatenation."""
    return node is not None and any(
        isinstance(n, ast.Constant) and isinstance(n.value, str) and "LOCALSERVE_" in n.value
        for n in ast.walk(node))


def _environ_reads(tree: ast.AST):
    """(line, key node) of every os.environ[...] / .get / .pop / .setdefault / getenv / `in`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _names_environ(node.value):
            yield node.lineno, node.slice
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            if _names_environ(f) or (isinstance(f, ast.Attribute) and _names_environ(f.value)):
                yield node.lineno, node.args[0]
        elif isinstance(node, ast.Compare) and any(_names_environ(c) for c in node.comparators):
            yield node.lineno, node.left


def test_no_localserve_variable_is_read_outside_envs():
    found = []
    for path in _sources():
        if path in ALLOWED:
            continue
        tree = ast.parse(path.read_text(), str(path))
        found += [f"{path.relative_to(REPO)}:{line}" for line, key in _environ_reads(tree)
                  if _mentions_knob(key)]
    assert not found, f"read LOCALSERVE_* through localserve.envs instead: {found}"


def test_the_scan_sees_each_way_of_reading():
    code = ('import os\nfrom os import environ, getenv\nos.environ.get("LOCALSERVE_A")\n'
            'os.environ["LOCALSERVE_B"]\ngetenv("LOCALSERVE_C", "1")\nenviron.pop(f"LOCALSERVE_{x}")\n'
            '"LOCALSERVE_D" in os.environ\nos.environ.get("HF_HOME")\n')
    keys = [key for _, key in _environ_reads(ast.parse(code))]
    assert [_mentions_knob(k) for k in keys] == [True, True, True, True, True, False]


def test_every_variable_the_code_and_readme_name_is_declared():
    """A LOCALSERVE_ name in the shipped source (code, messages, docstrings) or the README is a
    knob: no undeclared variable, no stale name."""
    undeclared = {}
    for path in [*_sources(), REPO / "README.md"]:
        for name in set(NAME.findall(path.read_text())) - set(KNOBS):
            undeclared.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not undeclared, f"not declared in localserve/envs.py: {undeclared}"


@pytest.mark.parametrize("knob", KNOBS.values(), ids=list(KNOBS))
def test_each_knob_is_declared_with_a_doc_and_a_default_that_parses(knob, monkeypatch):
    assert getattr(envs, knob.name.removeprefix("LOCALSERVE_")) is knob  # envs.CASCADE, ...
    assert knob.type and knob.group
    assert knob.doc.strip() and "\n" not in knob.doc, "one line of doc"
    default = knob.default_value  # parses, or EnvError
    monkeypatch.delenv(knob.name, raising=False)
    assert knob.get() == default


def test_up_settings_are_the_knobs_with_a_setting():
    from localserve.server.settings import ServeSettings, env_name

    defaults = ServeSettings()
    assert set(envs.UP_SETTINGS) == {f.name for f in fields(ServeSettings)}
    for name, knob in envs.UP_SETTINGS.items():
        assert env_name(name) == knob.name
        assert getattr(defaults, name) == knob.default_value


def test_reads_are_lazy_and_keep_each_variables_meaning(monkeypatch):
    monkeypatch.setenv("LOCALSERVE_GEMV", "0")
    assert envs.GEMV.get() is False
    for text in ("1", "", "yes"):  # the 0|1 flags: anything but "0" is on
        monkeypatch.setenv("LOCALSERVE_GEMV", text)
        assert envs.GEMV.get() is True
    for text, value in (("off", False), (" TRUE ", True), ("", None), ("auto", None)):
        monkeypatch.setenv("LOCALSERVE_ASYNC_SCHEDULING", text)
        assert envs.ASYNC_SCHEDULING.get() is value
    monkeypatch.setenv("LOCALSERVE_HOME", "")  # empty: unset
    assert envs.HOME.get() is None
    monkeypatch.setenv("LOCALSERVE_CASCADE", "force")
    assert envs.CASCADE.get() == "force"
    monkeypatch.setenv("LOCALSERVE_FI_NO_SPLIT_MIN", "0")
    assert envs.FI_NO_SPLIT_MIN.get() == 0
    monkeypatch.setenv("LOCALSERVE_PIECEWISE_MAX_TOKENS", "")
    assert envs.PIECEWISE_MAX_TOKENS.get() == 2048
    monkeypatch.setenv("LOCALSERVE_API_KEY", " k1, ,k2")
    assert envs.API_KEY.get() == ("k1", "k2")


@pytest.mark.parametrize("text,value", [("", 64 << 20), ("0", 0), ("512", 512), ("512m", 512 << 20),
                                        ("1.5GiB", 3 << 29), (" 2 GB ", 2 << 30), ("1P", 1 << 50)])
def test_disk_reserve_units(monkeypatch, text, value):
    monkeypatch.setenv("LOCALSERVE_DISK_RESERVE", text)
    assert envs.DISK_RESERVE.get() == value


@pytest.mark.parametrize("knob,text,words", [
    (envs.DISK_RESERVE, "lots", "LOCALSERVE_DISK_RESERVE='lots': expected bytes, e.g. 512M or 2G"),
    (envs.GC_THRESHOLD, "many", "LOCALSERVE_GC_THRESHOLD='many': expected an integer"),
    (envs.CASCADE_MIN_GB, "two", "LOCALSERVE_CASCADE_MIN_GB='two': expected a number"),
])
def test_a_value_that_does_not_parse_names_the_variable(monkeypatch, knob, text, words):
    monkeypatch.setenv(knob.name, text)
    with pytest.raises(EnvError, match=re.escape(words)):
        knob.get()


def test_envs_imports_nothing_heavy():
    code = ("import sys, localserve.envs; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'litestar', "
            "'textual', 'platformdirs', 'httpx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_envs_command_lists_every_knob(capsys):
    from localserve.cli import main

    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    for knob in KNOBS.values():
        line = next(x for x in out.splitlines() if x.startswith(knob.name + " "))
        assert knob.type in line and "default: " in line
    assert "# cuda backend" in out and "fp8: KV pages in e4m3" in out


def test_a_bad_variable_is_a_one_line_error_from_the_cli(monkeypatch, capsys):
    from localserve.cli import main

    monkeypatch.delenv("LOCALSERVE_URL", raising=False)
    monkeypatch.setenv("LOCALSERVE_PORT", "eighty")
    assert main(["tui"]) == 2
    assert capsys.readouterr().err.strip() == "localserve tui: LOCALSERVE_PORT='eighty': expected an integer"
