"""`localserve up` settings: flags > LOCALSERVE_* environment > config file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from localserve.server.settings import ServeSettings, SettingsError, resolve_settings


def test_precedence(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[up]\nport = 9000\nhost = "127.0.0.2"\nmax-running = 3\napi_keys = ["a", "b"]\n')
    env = {"LOCALSERVE_PORT": "9100", "LOCALSERVE_MAX_QUEUED": "7"}
    s = resolve_settings({"port": 9200}, env, cfg)
    assert s.port == 9200  # flag beats env and file
    assert s.max_queued == 7  # env beats default
    assert s.host == "127.0.0.2" and s.max_running == 3 and s.api_keys == ("a", "b")  # file beats defaults
    assert resolve_settings({}, env, cfg).port == 9100  # env beats file
    assert resolve_settings({}, {}, tmp_path / "missing.toml") == ServeSettings()


def test_api_keys_from_env_and_flags(tmp_path):
    s = resolve_settings({}, {"LOCALSERVE_API_KEY": "k1, k2"}, tmp_path / "none.toml")
    assert s.api_keys == ("k1", "k2")
    assert resolve_settings({"api_keys": ["x"]}, {"LOCALSERVE_API_KEY": "k1"}, tmp_path / "n.toml").api_keys == ("x",)


@pytest.mark.parametrize("text,words", [
    ("port = 'abc'", "port must be int"),
    ("colour = 3", "unknown setting"),
    ("port = ", "not valid TOML"),
])
def test_bad_config_file_is_a_clear_error(tmp_path, text, words):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    with pytest.raises(SettingsError, match=words):
        resolve_settings({}, {}, cfg)


def test_bad_env_value(tmp_path):
    with pytest.raises(SettingsError, match="LOCALSERVE_PORT"):
        resolve_settings({}, {"LOCALSERVE_PORT": "eighty"}, tmp_path / "none.toml")


@pytest.mark.parametrize("field,env,bad", [("weights", "LOCALSERVE_WEIGHTS", "fp4"),
                                            ("kv_dtype", "LOCALSERVE_KV_DTYPE", "int4")])
def test_fp8_choices(tmp_path, field, env, bad):
    none = tmp_path / "none.toml"
    assert getattr(resolve_settings({}, {}, none), field) == "auto"
    assert getattr(resolve_settings({}, {env: "fp8"}, none), field) == "fp8"
    with pytest.raises(SettingsError, match=f"{field} must be one of auto, fp8"):
        resolve_settings({field: bad}, {}, none)


@pytest.mark.parametrize("config,words", [({"weight_format": "fp8"}, "fp8 weights need an NVIDIA GPU"),
                                          ({"kv_dtype": "fp8"}, "fp8 KV cache needs an NVIDIA GPU")])
def test_fp8_on_the_cpu_backend_is_a_clear_load_error(config, words):
    from localserve.backends.cpu.backend import CPUBackend
    from localserve.engine.backend import BackendConfig
    from localserve.errors import ModelLoadError
    from localserve.models.loader import load_weights

    with pytest.raises(ModelLoadError, match=words):
        CPUBackend().load(load_weights("random:tiny-llama"), BackendConfig(**config))


def test_every_up_flag_reaches_the_settings(monkeypatch, tmp_path):
    """`localserve up --kv-dtype fp8 --weights fp8 ...` through the real parser and run_up:
    each flag lands in ServeSettings (serve stubbed)."""
    import argparse

    from localserve.server import cli

    monkeypatch.setenv("LOCALSERVE_CONFIG", str(tmp_path / "none.toml"))
    seen = []
    monkeypatch.setattr(cli, "serve", lambda settings: seen.append(settings) or 0)
    p = argparse.ArgumentParser()
    cli.add_up_parser(p.add_subparsers())
    args = p.parse_args(["up", "--kv-dtype", "fp8", "--weights", "fp8", "--max-running", "7",
                         "--kv-memory", "0.5", "--allowed-hosts", "box.lan", "--allowed-hosts", "nas"])
    assert args.func(args) == 0
    (s,) = seen
    assert (s.kv_dtype, s.weights, s.max_running, s.kv_memory) == ("fp8", "fp8", 7, 0.5)
    assert s.allowed_hosts == ("box.lan", "nas")
    bad = p.parse_args(["up", "--kv-dtype", "int4"])
    assert bad.func(bad) == 2


def test_batch_shape_and_memory_share_default_to_the_backends():
    from localserve.engine.backend import ServingDefaults
    from localserve.server.cli import serving_shape

    gpu = ServingDefaults(max_num_seqs=1024, max_num_batched_tokens=8192, memory_utilization=0.9)
    s = resolve_settings({}, env={}, path=Path("/nonexistent"))
    assert s.max_running is None and s.kv_memory is None and s.max_queued == 4096
    shape = serving_shape(s, gpu)
    assert (shape.max_num_seqs, shape.max_num_batched_tokens, shape.memory_utilization) == (1024, 8192, 0.9)
    assert "the backend's default" in shape.describe()
    s = resolve_settings({"max_running": 16, "kv_memory": 0.5}, env={}, path=Path("/nonexistent"))
    shape = serving_shape(s, gpu)
    assert (shape.max_num_seqs, shape.memory_utilization) == (16, 0.5) and "(set)" in shape.describe()
    s = resolve_settings({"max_running": 12000}, env={}, path=Path("/nonexistent"))
    assert serving_shape(s, gpu).max_num_batched_tokens == 12000  # a step holds every running decode
