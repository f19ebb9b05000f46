"""Where localserve keeps its files (platformdirs; LOCALSERVE_HOME overrides the data dir)."""

from __future__ import annotations

from pathlib import Path

import platformdirs

from localserve import envs

APP = "localserve"


def data_dir() -> Path:
    home = envs.HOME.get()
    path = Path(home) if home else Path(platformdirs.user_data_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    home = envs.HOME.get()
    path = Path(home) / "cache" if home else Path(platformdirs.user_cache_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_dir() -> Path:
    home = envs.HOME.get()
    return Path(home) / "config" if home else Path(platformdirs.user_config_dir(APP))


def config_file() -> Path:
    """LOCALSERVE_CONFIG names the file; else config.toml in the config dir."""
    explicit = envs.CONFIG.get()
    return Path(explicit) if explicit else config_dir() / "config.toml"
