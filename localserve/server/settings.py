"""`localserve up` settings. Precedence: command-line flags > LOCALSERVE_* environment variables >
the [up] table of the config file (LOCALSERVE_CONFIG, else config.toml in the platformdirs config
dir) > defaults. Each setting's variable, default and doc are declared in localserve/envs.py
(`envs.UP_SETTINGS`, by field name)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from localserve import envs
from localserve.paths import config_file


@dataclass(slots=True)
class ServeSettings:
    """The defaults are the knobs' (envs.py): one declaration for the variable and the setting."""

    model: str | None = envs.MODEL.default_value  # None: the embedded default model
    host: str = envs.HOST.default_value
    port: int = envs.PORT.default_value
    backend: str = envs.BACKEND.default_value
    ctx: int | None = envs.CTX.default_value  # None: the model's context (capped by the KV pool)
    max_running: int | None = envs.MAX_RUNNING.default_value  # None: the backend's recommendation
    max_queued: int = envs.MAX_QUEUED.default_value
    # max_tokens of a request that names none (0: up to the context)
    max_tokens_default: int = envs.MAX_TOKENS_DEFAULT.default_value
    api_keys: tuple[str, ...] = envs.API_KEY.default_value
    served_model_name: str | None = envs.SERVED_MODEL_NAME.default_value
    threads: int | None = envs.THREADS.default_value
    kv_memory: float | None = envs.KV_MEMORY.default_value  # None: the backend's (GPU 0.9, CPU 0.25)
    weights: str = envs.WEIGHTS.default_value  # "auto" | "fp8" (NVIDIA GPUs with FP8 tensor cores)
    # "auto" (the compute dtype) | "fp8" (e4m3 pages, NVIDIA FP8 GPUs)
    kv_dtype: str = envs.KV_DTYPE.default_value
    engine_process: str = envs.ENGINE_PROCESS.default_value  # "auto" | "on" | "off"
    cors_origins: tuple[str, ...] = envs.CORS_ORIGINS.default_value
    allowed_hosts: tuple[str, ...] = envs.ALLOWED_HOSTS.default_value
    max_body_mb: int = envs.MAX_BODY_MB.default_value
    log_level: str = envs.LOG_LEVEL.default_value


class SettingsError(ValueError):
    pass


def env_name(field_name: str) -> str:
    return envs.UP_SETTINGS[field_name].name


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
    if settings.engine_process not in ENGINE_PROCESS_CHOICES:
        raise SettingsError(f"engine_process must be one of {', '.join(ENGINE_PROCESS_CHOICES)}, "
                            f"got {settings.engine_process!r}")
    if settings.kv_dtype not in KV_DTYPE_CHOICES:
        raise SettingsError(f"kv_dtype must be one of {', '.join(KV_DTYPE_CHOICES)}, "
                            f"got {settings.kv_dtype!r}")
    return settings


WEIGHT_CHOICES = ("auto", "fp8")
KV_DTYPE_CHOICES = ("auto", "fp8")
ENGINE_PROCESS_CHOICES = ("auto", "on", "off")


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
