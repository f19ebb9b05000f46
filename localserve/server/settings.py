"""`localserve up` settings. Precedence: command-line flags > LOCALSERVE_* environment variables >
the [up] table of the config file (LOCALSERVE_CONFIG, else config.toml in the platformdirs config
dir) > defaults."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from localserve.paths import config_file


@dataclass(slots=True)
class ServeSettings:
    model: str | None = None  # None: the embedded default model
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    ctx: int | None = None  # None: the model's context (capped by the KV pool)
    max_running: int = 32
    max_queued: int = 256
    max_tokens_default: int = 4096  # max_tokens of a request that names none (0: up to the context)
    api_keys: tuple[str, ...] = ()
    served_model_name: str | None = None
    threads: int | None = None
    kv_memory: float = 0.25  # fraction of free memory the KV pages may take
    weights: str = "auto"  # "auto" | "fp8" (NVIDIA GPUs with FP8 tensor cores)
    kv_dtype: str = "auto"  # "auto" (the compute dtype) | "fp8" (e4m3 pages, NVIDIA FP8 GPUs)
    cors_origins: tuple[str, ...] = ()
    max_body_mb: int = 32
    log_level: str = "info"


ENV_PREFIX = "LOCALSERVE_"
# environment names that differ from the field names
ENV_NAMES = {"api_keys": "LOCALSERVE_API_KEY"}


class SettingsError(ValueError):
    pass


def env_name(field_name: str) -> str:
    return ENV_NAMES.get(field_name, ENV_PREFIX + field_name.upper())


def resolve_settings(flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
                     path: Path | None = None) -> ServeSettings:
    """flags: the values given on the command line (None = not given)."""
    env = os.environ if env is None else env
    path = path or config_file()
    from_file = _read_file(path)
    values: dict[str, Any] = {}
    for f in fields(ServeSettings):
        if flags.get(f.name) is not None:
            values[f.name] = _convert(f.name, f.type, flags[f.name], "flag")
        elif env.get(env_name(f.name)) not in (None, ""):
            values[f.name] = _convert(f.name, f.type, env[env_name(f.name)], env_name(f.name))
        elif f.name in from_file:
            values[f.name] = _convert(f.name, f.type, from_file[f.name], str(path))
    settings = ServeSettings(**values)
    if settings.weights not in WEIGHT_CHOICES:
        raise SettingsError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {settings.weights!r}")
    if settings.max_tokens_default < 0:
        raise SettingsError(f"max_tokens_default must be 0 (no default cap) or more, got {settings.max_tokens_default}")
    if settings.kv_dtype not in KV_DTYPE_CHOICES:
        raise SettingsError(f"kv_dtype must be one of {', '.join(KV_DTYPE_CHOICES)}, "
                            f"got {settings.kv_dtype!r}")
    return settings


WEIGHT_CHOICES = ("auto", "fp8")
KV_DTYPE_CHOICES = ("auto", "fp8")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from exc
    table = data.get("up", data)
    known = {f.name for f in fields(ServeSettings)}
    unknown = sorted(k.replace("-", "_") for k in table if k.replace("-", "_") not in known and k != "up")
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return {k.replace("-", "_"): v for k, v in table.items() if k != "up"}


def _convert(name: str, kind: str, value: Any, source: str) -> Any:
    try:
        if "tuple" in kind:
            if isinstance(value, str):
                return tuple(x.strip() for x in value.split(",") if x.strip())
            return tuple(str(x) for x in value)
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{source}: {name} must be {kind.split(' ')[0]}, got {value!r}") from None
