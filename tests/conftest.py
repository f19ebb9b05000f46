"""Shared fixtures. LOCALSERVE_HOME points at a temporary directory for the whole session so
tests never touch the user's data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def localserve_home(tmp_path_factory) -> Path:
    home = os.environ.get("LOCALSERVE_TEST_HOME")
    path = Path(home) if home else tmp_path_factory.mktemp("localserve_home")
    os.environ["LOCALSERVE_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def default_gguf(localserve_home) -> Path:
    """The embedded default model (Gemma 3 270M Q4_K_M), assembled once per session."""
    from localserve.runtime.default_model import default_model_path

    return default_model_path()
