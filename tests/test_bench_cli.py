"""`localserve bench`: prompt construction, timing maths, and the CLI end to end on a random model
(and, marked slow, on the default GGUF side by side with llama.cpp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from localserve.bench.config import BenchConfig
from localserve.bench.prompts import DECODE_TEXT, PromptFactory, TextEncoder
from localserve.bench.timing import BatchTiming, StreamTiming
from localserve.cli import build_parser, main

TINY_ARGS = [
    "bench", "--model", "random:tiny-llama", "--backend", "cpu", "--no-peer",
    "--repeats", "2", "--warmup", "1", "--threads", "1",
    "--decode-tokens", "4", "--prefill-tokens", "32", "--concurrency", "2,3",
    "--concurrent-tokens", "3", "--prefix-tokens", "64",
]
ALL_KEYS = {"decode", "prefill", "concurrent_2", "concurrent_3", "prefix_cold", "prefix_hit", "ttft_short"}


def _hash_factory(vocab: int = 512, bos: int | None = 1) -> PromptFactory:
    return PromptFactory(TextEncoder(None, vocab, bos), seed=0)


# -- prompts --------------------------------------------------------------------------------------
def test_fresh_exact_has_exact_length_and_bos():
    f = _hash_factory()
    for n in (1, 7, 32, 512):
        ids = f.fresh_exact(n)
        assert len(ids) == n and ids[0] == 1


def test_fresh_prompts_never_share_more_than_bos():
    f = _hash_factory(vocab=262144)
    prompts = [f.fresh_exact(40) for _ in range(30)] + f.fresh_questions(16) + [f.fresh_short() for _ in range(5)]
    seconds = [p[1] for p in prompts]
    assert len(set(seconds)) == len(seconds)


def test_system_prompt_is_fixed_and_exact():
    f, g = _hash_factory(), _hash_factory()
    assert f.system_prompt(300) == g.system_prompt(300)
    assert len(f.system_prompt(300)) == 300
    assert f.question(1) != f.question(2)


def test_hash_encoder_stays_in_vocab_and_off_special_ids():
    enc = TextEncoder(None, 64, 1)
    ids = enc("a b c " * 50 + DECODE_TEXT)
    assert ids and all(16 <= t < 64 for t in ids)


def test_encoder_strips_a_leading_bos():
    enc = TextEncoder(lambda text: [7, 5, 6], 100, 7)
    assert enc("x") == [5, 6]


# -- timing maths ---------------------------------------------------------------------------------
def test_decode_rate_excludes_prefill():
    t = StreamTiming(start=0.0, token_times=[5.0, 5.5, 6.0, 6.5, 7.0], num_prompt_tokens=3)
    assert t.ttft == 5.0
    assert t.decode_rate == pytest.approx(4 / 2.0)
    assert BatchTiming(wall=2.0, num_tokens=10, num_requests=2).rate == 5.0


def test_config_rejects_unknown_figure():
    with pytest.raises(ValueError):
        BenchConfig(only=("decode", "nope"))


def test_foreign_cpu_meter_sees_another_busy_process():
    from localserve.bench.machine import ForeignCpuMeter

    meter = ForeignCpuMeter()
    subprocess.run([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"],
                   check=True, timeout=60)
    share = meter.foreign_share()
    assert share is not None and 0.2 < share <= 1.0


def test_wait_until_quiet_gives_up_on_a_busy_machine():
    from localserve.bench.suite import wait_until_quiet

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4.0: pass"])
    try:
        logged: list[str] = []
        share = wait_until_quiet(1.0, logged.append)
        assert share is not None and share >= 0.1 and "still busy" in logged[0]
    finally:
        busy.kill()
        busy.wait()


# -- CLI -------------------------------------------------------------------------------------------
def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--backend", "--repeats", "--no-peer", "--threads", "--only", "--json", "--markdown",
                "--serving", "--stream-overhead", "--client-procs", "--request-rate", "--in-process"):
        assert opt in out


def test_serving_options_parse_and_refuse_nonsense():
    parser = build_parser()
    args = parser.parse_args(["bench", "--serving", "--request-rate", "inf", "--client-procs", "auto"])
    assert args.serving and args.request_rate == float("inf") and args.client_procs is None
    args = parser.parse_args(["bench", "--serving", "--request-rate", "2.5", "--client-procs", "3"])
    assert args.request_rate == 2.5 and args.client_procs == 3
    for bad in (["--request-rate", "0"], ["--client-procs", "0"], ["--http-client", "curl"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--serving", *bad])
    assert main(["bench", "--serving", "--endpoint", "chat", "--prompt-format", "ids"]) == 2


def test_subcommands_register_through_one_function_each():
    parser = build_parser()
    args = parser.parse_args(["bench", "--only", "decode,ttft", "--concurrency", "4,16"])
    assert args.only == ("decode", "ttft") and args.concurrency == (4, 16) and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "decode,bogus"])


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "localserve", "bench", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--no-peer" in out.stdout


def test_bench_on_random_tiny_llama(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(TINY_ARGS + ["--json", str(path), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "| figure | localserve | llama.cpp | ratio |" in out

    data = json.loads(path.read_text())
    assert {f["key"] for f in data["figures"]} == ALL_KEYS
    for fig in data["figures"]:
        samples = fig["samples"]["localserve"]
        assert len(samples) == 2 and all(v > 0 for v in samples), fig
        assert "llama.cpp" not in fig["samples"]
    by_key = {f["key"]: f for f in data["figures"]}
    assert all(d["prompt_tokens"] == 32 for d in by_key["prefill"]["details"]["localserve"])
    assert all(d["cached_tokens"] == 0 for d in by_key["prefill"]["details"]["localserve"])
    assert all(d["tokens"] == 4 for d in by_key["decode"]["details"]["localserve"])
    assert all(d["tokens"] == 3 * 3 for d in by_key["concurrent_3"]["details"]["localserve"])
    # the hit reuses the shared system prompt; the cold run reuses nothing past BOS
    assert all(d["cached_tokens"] == 0 for d in by_key["prefix_cold"]["details"]["localserve"])
    assert all(d["cached_tokens"] >= 64 for d in by_key["prefix_hit"]["details"]["localserve"])
    assert all(fig["foreign_cpu"] is None or 0.0 <= fig["foreign_cpu"] <= 1.0 for fig in data["figures"])
    m = data["machine"]
    assert m["cpu_model"] and m["logical_cores"] >= 1 and m["torch"] and m["date"]
    assert any("llama.cpp not measured" in n for n in data["notes"])

    assert main(["bench", "--from-json", str(path), "--markdown"]) == 0
    assert "| figure | localserve | llama.cpp | ratio |" in capsys.readouterr().out


def test_only_picks_the_probes():
    from localserve.bench.figures import build_probes

    keys = [f.key for p in build_probes(BenchConfig(only=("decode", "concurrent"), concurrency=(4, 16)))
            for f in p.figures()]
    assert keys == ["decode", "concurrent_4", "concurrent_16"]


@pytest.mark.slow
def test_bench_default_gguf_side_by_side_with_llama_cpp(tmp_path, default_gguf):
    pytest.importorskip("llama_cpp")
    path = tmp_path / "bench.json"
    args = ["bench", "--model", str(default_gguf), "--backend", "cpu", "--repeats", "1", "--warmup", "0", "--decode-tokens", "3",
            "--prefill-tokens", "16", "--concurrency", "2", "--concurrent-tokens", "2", "--prefix-tokens", "48",
            "--json", str(path)]
    assert main(args) == 0
    data = json.loads(path.read_text())
    assert not any("disagree" in n for n in data["notes"]), data["notes"]
    for fig in data["figures"]:
        assert set(fig["samples"]) == {"localserve", "llama.cpp"}
        assert all(v > 0 for s in fig["samples"].values() for v in s)
    hit = {f["key"]: f for f in data["figures"]}["prefix_hit"]["details"]
    assert hit["llama.cpp"][0]["cached_tokens"] >= 48 and hit["localserve"][0]["cached_tokens"] >= 32


def test_the_meter_sees_another_process_using_the_cpu():
    import time

    from localserve.bench.machine import ForeignCpuMeter

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"])
    try:
        time.sleep(0.3)  # the child is running its loop
        meter = ForeignCpuMeter()
        time.sleep(0.5)
        share = meter.foreign_share()
    finally:
        busy.kill()
        busy.wait()
    cores = len(os.sched_getaffinity(0))
    # one spinning process holds one core for the whole window
    assert share is not None and share >= 0.6 / cores, share
    meter = ForeignCpuMeter()
    quiet_share = meter.foreign_share()  # under 50 ms: too coarse to say
    assert quiet_share is None


def test_noisy_runs_are_measured_again(monkeypatch):
    from localserve.bench import suite

    shares = iter([0.6, 0.0])  # the first run saw another process, the rerun did not

    class ScriptedMeter:
        def foreign_share(self):
            return next(shares)

    monkeypatch.setattr(suite, "ForeignCpuMeter", ScriptedMeter)
    cfg = BenchConfig(model="random:tiny-llama", backend="cpu", peer=False, repeats=1, warmup=0, threads=1,
                      only=("prefill",), prefill_tokens=300, retry_noisy=1)
    logged: list[str] = []
    result = suite.run_bench(cfg, logged.append)
    assert any("others used 60% of the CPU, measuring again" in line for line in logged), logged
    (detail,) = result.figure("prefill").details["localserve"]
    # the rerun used a fresh prompt nothing had cached, and its own share is what was recorded
    assert detail["prompt_tokens"] == 300 and detail["cached_tokens"] == 0 and detail["foreign_cpu"] == 0.0


def test_a_prompt_larger_than_the_kv_pool_is_refused_not_waited_on():
    from localserve.bench.suite import run_bench
    from localserve.errors import ContextOverflowError

    # 8 blocks of 16 tokens cannot hold a 200-token prompt: the context is capped at 128
    cfg = BenchConfig(model="random:tiny-llama", backend="cpu", peer=False, repeats=1, warmup=0, threads=1,
                      only=("prefill",), prefill_tokens=200, num_blocks=8)
    with pytest.raises(ContextOverflowError, match="maximum context length is 128 tokens"):
        run_bench(cfg, lambda line: None)


def test_stream_overhead_against_a_real_server(tmp_path, capsys):
    """`bench --stream-overhead`: the same greedy stream in-process and through a `localserve up`
    subprocess; both sides report positive wall and CPU time per token."""
    out = tmp_path / "serving.json"
    code = main(["bench", "--stream-overhead", "--model", "random:tiny-llama", "--backend", "cpu", "--threads", "1",
                 "--decode-tokens", "48", "--repeats", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| wall ms/token (decode) |" in table and "server (HTTP + SSE)" in table
    d = json.loads(out.read_text())
    assert len(d["server"]) == len(d["in_process"]) == 2
    for side in ("in_process", "server"):
        assert d["median"][side]["wall_ms_per_token"] > 0
    # the server process did the decoding, so its CPU clock moved (10 ms ticks: summed over runs)
    assert sum(r["cpu_ms_per_token"] for r in d["server"]) > 0
    assert d["tokens"] == 48
