"""The `localserve` command. Each subcommand registers itself through one `add_<name>_parser`
function that sets `func`; `main` only dispatches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _csv_names(text: str) -> tuple[str, ...]:
    from localserve.bench.config import FIGURE_GROUPS

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in FIGURE_GROUPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown figure(s) {bad}; choose from {', '.join(FIGURE_GROUPS)}")
    return names


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from localserve.bench.config import FIGURE_GROUPS, BenchConfig

    d = BenchConfig()
    p = sub.add_parser(
        "bench",
        help="measure the engine in-process beside llama.cpp, or a running server (--serving)",
        description=(
            "Measures localserve's engine in-process and llama.cpp (llama-cpp-python) on the same GGUF "
            "with the same token ids: single-stream decode, prefill, aggregate throughput at N concurrent "
            "requests, TTFT of a ~2k-token system prompt cold vs prefix hit, TTFT of a short prompt. "
            "Medians of --repeats after a warm-up; the engines alternate within each repeat. "
            "--serving drives a running `localserve up` over HTTP instead (vLLM's benchmark_serving.py "
            "figures); --stream-overhead, --grammar and --grammar-budget measure one thing each."
        ),
    )
    p.add_argument("--model", default=None, help="model reference: a .gguf, an HF folder or random:NAME "
                   "(default: the embedded Gemma 3 270M GGUF)")
    p.add_argument("--backend", default=d.backend, help="localserve backend (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads for both engines (default: {d.threads}; --serving --in-process: the local "
                   "server's --threads, else the backend's)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="measured repeats per figure (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="unmeasured runs first (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="prompt text seed (default: %(default)s)")
    p.add_argument("--only", type=_csv_names, default=d.only,
                   help=f"comma-separated subset of: {','.join(FIGURE_GROUPS)} (default: all)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="measure localserve only")
    p.add_argument("--peer-ctx", type=int, default=d.peer_ctx, help="llama.cpp n_ctx (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="decode stream length (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=int, default=d.prefill_tokens, help="prefill prompt length (default: %(default)s)")
    p.add_argument("--concurrency", type=_csv_ints, default=d.concurrency,
                   help="concurrent request counts (default: %s)" % ",".join(map(str, d.concurrency)))
    p.add_argument("--concurrent-tokens", type=int, default=d.concurrent_tokens,
                   help="tokens per concurrent request (default: %(default)s)")
    p.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens,
                   help="shared system prompt length (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="localserve engine max_num_seqs")
    p.add_argument("--num-blocks", type=int, default=None, help="localserve KV blocks (default: 4x what the workload holds at once, at least 8k tokens)")
    p.add_argument("--quiet-wait", type=float, default=d.quiet_wait, metavar="SECONDS",
                   help="before each measured run wait up to SECONDS for other processes to use <10%% "
                   "of the CPU (default: %(default)s, no wait)")
    p.add_argument("--retry-noisy", type=int, default=d.retry_noisy, metavar="N",
                   help="measure a run again, up to N times, when other processes used >10%% of the CPU "
                   "during it (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write every raw figure and the machine info here")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table for BENCHMARKS.md")
    p.add_argument("--from-json", metavar="PATH", help="render a saved --json result instead of measuring")
    p.add_argument("--stream-overhead", action="store_true",
                   help="measure the server's streaming overhead instead: the same greedy stream of "
                   "--decode-tokens in-process and through `localserve up` (HTTP + SSE), alternating, "
                   "--repeats times; prints wall and CPU ms per token of each and the difference")
    p.add_argument("--grammar", action="store_true",
                   help="measure grammar-constrained decoding instead: mask time per token, decode tok/s of "
                   "json_schema vs unconstrained (equal lengths, alternating, jump-forward on and off) at 1 and "
                   "16 concurrent requests (--concurrency if given), and the jump-forward share; constrained "
                   "requests get at most --decode-tokens tokens")
    p.add_argument("--grammar-budget", type=_csv_ints, nargs="?", const=(32, 64, 128, 200), metavar="MAX_TOKENS",
                   help="check structured output under a token budget instead: through `localserve up` and the "
                   "openai SDK, 24 JSON schemas, json_object and forced tool calls at each MAX_TOKENS (default "
                   "32,64,128,200), temperature 1.0 and 0.7, fixed seeds; counts the answers that parse and "
                   "validate")
    p.add_argument("--url", help="the running server to drive: --serving (default: http://127.0.0.1:8000), "
                   "--grammar-budget (default: start `localserve up`)")
    _add_serving_arguments(p)
    p.set_defaults(func=run_bench_command)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of requests per second or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError("the request rate must be positive (or inf)")
    return rate


def _procs(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 1 or auto, got {text!r}")
    return n


def _add_serving_arguments(p: argparse.ArgumentParser) -> None:
    from localserve.bench.serving_config import (
        DATASETS, ENDPOINTS, HTTP_CLIENTS, PROMPT_FORMATS, STREAMS_PER_PROC, ServingBenchConfig)

    d = ServingBenchConfig()
    g = p.add_argument_group(
        "--serving", "drive a running `localserve up` over HTTP as vLLM's benchmark_serving.py does: streamed "
        "requests with ignore_eos and a fixed max_tokens each, all at once or Poisson arrivals; reports "
        "TTFT, TPOT, ITL, E2E latency, throughputs and the client's own CPU cost. --warmup N untimed requests "
        "first, --seed for the workload, --json PATH for the result")
    g.add_argument("--serving", action="store_true", help="run the serving benchmark against --url")
    g.add_argument("--endpoint", choices=tuple(ENDPOINTS), default=d.endpoint,
                   help="/v1/completions or /v1/chat/completions (default: %(default)s)")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="random: --input-len/--output-len; sharegpt-like: lognormal lengths shaped like ShareGPT's "
                   "(mean 214 in, 198 out); prefix-repetition: --num-prefixes shared prefixes of --prefix-len tokens, "
                   "each prompt one of them and --input-len tokens of its own (default: %(default)s)")
    g.add_argument("--input-len", default=d.input_len, metavar="N|LO:HI",
                   help="random dataset: prompt tokens, fixed or uniform in LO..HI; prefix-repetition: the tokens "
                   "after the shared prefix (default: %(default)s)")
    g.add_argument("--prefix-len", type=int, default=d.prefix_len, metavar="N",
                   help="prefix-repetition dataset: tokens of each shared prefix (default: %(default)s)")
    g.add_argument("--num-prefixes", type=int, default=d.num_prefixes, metavar="P",
                   help="prefix-repetition dataset: the prompts spread evenly over P prefixes, in a shuffled order; "
                   "the run reports the server's prefix-cache hit rate (default: %(default)s)")
    g.add_argument("--output-len", default=d.output_len, metavar="N|LO:HI",
                   help="random dataset: max_tokens (exact, EOS ignored), fixed or uniform in LO..HI (default: %(default)s)")
    g.add_argument("--num-prompts", type=int, default=d.num_prompts, help="requests (default: %(default)s)")
    g.add_argument("--request-rate", type=_rate, default=d.request_rate, metavar="RATE",
                   help="requests per second, Poisson arrivals; inf: all at once (default: inf)")
    g.add_argument("--max-concurrency", type=int, default=None, metavar="C",
                   help="at most C requests in flight (default: no limit)")
    g.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=d.prompt_format,
                   help="token-id lists or text; auto: text when the model has a tokenizer (default: %(default)s)")
    g.add_argument("--http-client", choices=HTTP_CLIENTS, default=d.http_client,
                   help="builtin: a lean HTTP/1.1 client, a few microseconds of CPU an event; httpx: a check on it, "
                   "far more CPU an event (default: %(default)s)")
    g.add_argument("--client-procs", type=_procs, default=None, metavar="K|auto",
                   help="spread the requests over K client processes; auto: one for every "
                   f"{STREAMS_PER_PROC} streams in flight, at most a quarter of the cores (default: auto)")
    g.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    g.add_argument("--in-process", action="store_true",
                   help="also drive the same workload into an LLMEngine in this process (--model, --backend, "
                   "--threads; default: the server's model and backend) and print both, with their ratio")


def run_bench_command(args: argparse.Namespace) -> int:
    from localserve.bench.config import BenchConfig
    from localserve.bench.report import markdown_table, text_table
    from localserve.bench.suite import BenchResult, run_bench

    if args.serving:
        return _run_serving(args)
    if args.threads is None:
        args.threads = BenchConfig().threads
    if args.stream_overhead:
        return _run_stream_overhead(args)
    if args.grammar_budget:
        return _run_grammar_budget(args)
    if args.grammar:
        return _run_grammar(args)
    if args.from_json:
        result = BenchResult.read_json(args.from_json)
    else:
        try:
            cfg = BenchConfig(
                model=args.model, backend=args.backend, threads=args.threads, repeats=args.repeats,
                warmup=args.warmup, seed=args.seed, only=args.only, peer=args.peer, peer_ctx=args.peer_ctx,
                decode_tokens=args.decode_tokens, prefill_tokens=args.prefill_tokens,
                concurrency=args.concurrency, concurrent_tokens=args.concurrent_tokens,
                prefix_tokens=args.prefix_tokens, quiet_wait=args.quiet_wait,
                retry_noisy=args.retry_noisy, max_num_seqs=args.max_num_seqs, num_blocks=args.num_blocks,
            )
        except ValueError as exc:
            print(f"localserve bench: {exc}", file=sys.stderr)
            return 2
        result = run_bench(cfg)
    print(text_table(result))
    if args.markdown:
        print()
        print(markdown_table(result))
    if args.json:
        result.write_json(args.json)
        print(f"\nraw figures written to {args.json}", file=sys.stderr)
    return 0


def _run_serving(args: argparse.Namespace) -> int:
    from localserve.bench.serving import run_serving_bench
    from localserve.bench.serving_config import ServingBenchConfig
    from localserve.bench.serving_report import write_json

    try:
        cfg = ServingBenchConfig(
            url=(args.url or ServingBenchConfig().url).rstrip("/"), endpoint=args.endpoint, dataset=args.dataset,
            input_len=args.input_len, output_len=args.output_len, num_prompts=args.num_prompts,
            request_rate=args.request_rate, max_concurrency=args.max_concurrency, warmup=args.warmup, seed=args.seed,
            prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
            prompt_format=args.prompt_format, http_client=args.http_client, client_procs=args.client_procs,
            api_key=args.api_key, in_process=args.in_process, model=args.model, backend=args.backend,
            threads=args.threads)
    except ValueError as exc:
        print(f"localserve bench: {exc}", file=sys.stderr)
        return 2
    import httpx

    try:
        result = run_serving_bench(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    except httpx.HTTPError as exc:
        print(f"localserve bench: cannot reach the server at {cfg.url}: {exc} (start it with `localserve up`)",
              file=sys.stderr)
        return 1
    print(result.table())
    if args.json:
        write_json(result, args.json)
        print(f"\nresult written to {args.json}", file=sys.stderr)
    return 0 if result.http["failed"] == 0 else 1


def _run_stream_overhead(args: argparse.Namespace) -> int:
    from localserve.bench.stream_overhead import run_stream_overhead

    backend = "cpu" if args.backend == "auto" else args.backend
    result = run_stream_overhead(args.model, backend, args.threads, tokens=args.decode_tokens,
                                 repeats=args.repeats, warmup=args.warmup,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
    return _report(result, args.json)


def _report(result, json_path: str | None) -> int:
    """Prints a bench mode's table and writes its raw figures to --json."""
    import json

    print(result.table())
    if json_path:
        Path(json_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _run_grammar(args: argparse.Namespace) -> int:
    from localserve.bench.config import BenchConfig
    from localserve.bench.grammar import run_grammar_bench

    concurrency = (1, 16) if args.concurrency == BenchConfig().concurrency else args.concurrency
    result = run_grammar_bench(args.model, args.threads, concurrency, max_tokens=args.decode_tokens,
                               repeats=args.repeats, warmup=args.warmup,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    return _report(result, args.json)


def _run_grammar_budget(args: argparse.Namespace) -> int:
    from localserve.bench.grammar_budget import run_budget_bench

    backend = "cpu" if args.backend == "auto" else args.backend
    result = run_budget_bench(args.model, args.threads, backend, budgets=args.grammar_budget, url=args.url,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
    return _report(result, args.json)


def add_envs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "envs",
        help="list the LOCALSERVE_* environment variables: type, default, what each does",
        description="Every LOCALSERVE_* environment variable localserve reads (declared in "
        "localserve/envs.py), with its type, its default and what it does. For the `localserve up` "
        "settings a flag wins over the variable, and the variable over the config file's [up] table.",
    )
    p.set_defaults(func=run_envs)


def run_envs(args: argparse.Namespace) -> int:
    import shutil
    import textwrap

    from localserve.envs import KNOBS

    knobs = list(KNOBS.values())
    name_w = max(len(k.name) for k in knobs)
    type_w = max(len(k.type) for k in knobs)
    width = max(60, min(120, shutil.get_terminal_size().columns))
    group = None
    for k in knobs:
        if k.group != group:
            print(f"\n# {k.group}" if group else f"# {k.group}")
            group = k.group
        default = "unset" if k.default is None else (k.default or "empty")
        print(f"{k.name:<{name_w}}  {k.type:<{type_w}}  default: {default}")
        print(textwrap.fill(k.doc, width, initial_indent="    ", subsequent_indent="    "))
    return 0


# one registration function per subcommand; `up`, `pull`, ... add theirs here
from localserve.server.cli import add_up_parser  # noqa: E402 (argparse only; the server loads lazily)

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_up_parser, add_bench_parser, add_envs_parser]
from localserve.store.cli import STORE_SUBCOMMANDS; SUBCOMMANDS += STORE_SUBCOMMANDS  # noqa: E402,E702 pull ls show rm ps quantize
from localserve.tui.cli import add_tui_parser; SUBCOMMANDS.append(add_tui_parser)  # noqa: E402,E702 tui


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localserve", description="A local LLM server and its tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from localserve.envs import EnvError

    try:
        return args.func(args)
    except EnvError as exc:  # a LOCALSERVE_* variable that does not parse
        print(f"localserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
