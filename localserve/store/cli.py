"""`localserve pull | ls | show | rm | ps | quantize`: the model store from the command line.

Only argparse is imported at module level (`localserve --help` stays fast); each command
imports what it needs. Errors print one line on stderr and exit 1; nothing half-done stays
in the store. This module (a user surface) may reach the runtime, to assemble the embedded
default and to run the quality check; the import-linter contract lists these exceptions.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable


def _open_store():
    """The store, with the embedded default registered (first use assembles it once)."""
    from localserve.runtime.default_model import default_model_path
    from localserve.store.default import register_default
    from localserve.store.store import ModelStore

    store = ModelStore()
    register_default(store, default_model_path())
    return store


def _fail(cmd: str, msg: str, code: int = 1) -> int:
    print(f"localserve {cmd}: {msg}", file=sys.stderr)
    return code


def _guard(cmd: str, fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from localserve.errors import LocalServeError
        from localserve.store.names import InvalidNameError
        from localserve.store.store import StoreError

        try:
            return fn(args)
        except (StoreError, InvalidNameError, LocalServeError) as e:
            return _fail(cmd, str(e))
        except KeyboardInterrupt:
            hint = "; run the same pull again to resume" if cmd == "pull" else ""
            return _fail(cmd, f"interrupted{hint}", 130)

    return run


# -- pull ---------------------------------------------------------------------------------


def add_pull_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="download a model into the store",
        description="REF: a Hugging Face repo (org/name, org/name:Q4_K_M, org/name:file.gguf), an http(s) "
        "URL (optionally ending #sha256=<hex>) or a local .gguf file / HF folder. Downloads resume "
        "after an interruption; honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE.",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("--name", help="register as NAME[:TAG] (default: derived from REF)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_guard("pull", run_pull))


def run_pull(args: argparse.Namespace) -> int:
    from localserve.store.progress import format_bytes
    from localserve.store.pull import PullOptions, pull

    store = _open_store()
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    m = pull(args.ref, store, PullOptions(args.name, args.revision, show_progress=not args.quiet, log=log))
    print(f"pulled {m.ref} ({format_bytes(m.size)}, {m.architecture}, {m.quantization})")
    return 0


# -- ls -----------------------------------------------------------------------------------


def add_ls_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the models in the store")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.set_defaults(func=_guard("ls", run_ls))


def run_ls(args: argparse.Namespace) -> int:
    from localserve.store.progress import format_bytes

    models = _open_store().list()
    if args.json:
        for m in models:
            print(m.to_json().replace("\n", " "))
        return 0
    rows = [("NAME", "SIZE", "QUANT", "ARCH", "CTX", "MODIFIED")]
    for m in models:
        rows.append((m.ref, format_bytes(m.size), m.quantization, m.architecture, str(m.context), m.created[:16].replace("T", " ")))
    _table(rows)
    return 0


# -- show ---------------------------------------------------------------------------------


def add_show_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="a model's metadata, chat template and memory needs")
    p.add_argument("name", metavar="NAME", help="a store name, a .gguf file or an HF folder")
    p.add_argument("--ctx", type=int, default=None, help="context for the KV estimate (default: the model's)")
    p.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                   help="KV cache element type (default: %(default)s, the CPU backend's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard("show", run_show))


def run_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from localserve.store.model_info import available_memory, summarize_gguf, summarize_hf_folder
    from localserve.store.progress import format_bytes

    path = Path(args.name).expanduser()
    manifest = None
    if not path.exists():
        store = _open_store()
        manifest = store.lookup(args.name)
        path = store.model_path(manifest)
    s = summarize_hf_folder(path) if path.is_dir() else summarize_gguf(path)
    ctx = args.ctx or s.context
    if ctx <= 0:
        return _fail("show", f"--ctx must be positive, got {ctx}")
    kv, kv_floor = s.kv_bytes(ctx, args.kv_dtype), s.kv_bytes(ctx, args.kv_dtype, window_aware=True)
    weights = s.cpu_weight_bytes()
    need, avail = weights + kv, available_memory()
    template, template_note = s.chat_template, "from the file"
    if template is None:
        from localserve.models.chat_template import fallback_template_name, load_builtin_template

        name = fallback_template_name(s.architecture)
        template, template_note = load_builtin_template(name), f"none in the file; localserve's built-in {name!r}"
    if args.json:
        out = {k: getattr(s, k) for k in s.__slots__}
        out.update(path=str(path), ctx=ctx, kv_bytes=kv, kv_bytes_window_aware=kv_floor, weight_bytes_cpu=weights,
                   memory_needed=need, memory_available=avail, fits=need <= avail, chat_template=template)
        if manifest is not None:
            out.update(name=manifest.ref, source=manifest.source, created=manifest.created)
        print(json.dumps(out, indent=2))
        return 0
    window = f" ({format_bytes(kv_floor)} if sliding layers kept only their window)" if kv_floor != kv else ""
    lines = [
        ("name", manifest.ref if manifest else s.name or path.name),
        ("path", str(path)),
        ("source", manifest.source if manifest else "-"),
        ("format", s.format),
        ("architecture", s.architecture),
        ("parameters", f"{s.parameters / 1e6:.1f}M" if s.parameters < 1e9 else f"{s.parameters / 1e9:.2f}B"),
        ("quantization", s.quantization),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in sorted(s.tensor_types.items()))),
        ("context", str(s.context)),
        ("layers", str(s.num_layers)),
        ("hidden size", str(s.hidden_size)),
        ("heads (q / kv)", f"{s.num_heads} / {s.num_kv_heads}, head_dim {s.head_dim}"),
        ("sliding window", f"{s.sliding_window} on {s.num_sliding_layers} layers" if s.sliding_window else "-"),
        ("vocabulary", str(s.vocab_size)),
        ("weights on disk", format_bytes(s.weight_bytes)),
        ("weights in memory", f"{format_bytes(weights)} (CPU backend: matrices as Q8_0)"),
        (f"KV cache @ {ctx}", f"{format_bytes(kv)} ({args.kv_dtype}){window}"),
        ("memory needed", format_bytes(need)),
        ("memory available", format_bytes(avail)),
        ("fits", "yes" if need <= avail else f"no: {format_bytes(need - avail)} short; try a smaller --ctx"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    print(f"\nchat template ({template_note}):")
    print(template)
    return 0


# -- rm -----------------------------------------------------------------------------------


def add_rm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rm", help="remove models from the store")
    p.add_argument("names", metavar="NAME", nargs="+")
    p.set_defaults(func=_guard("rm", run_rm))


def run_rm(args: argparse.Namespace) -> int:
    from localserve.store.default import is_default
    from localserve.store.progress import format_bytes

    store = _open_store()
    for name in args.names:
        if is_default(store.lookup(name)):
            return _fail("rm", f"{name} is the embedded default model; it ships with localserve and stays")
    for name in args.names:
        m, freed = store.remove(name)
        print(f"deleted {m.ref} (freed {format_bytes(freed)})")
    return 0


# -- ps -----------------------------------------------------------------------------------


def add_ps_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ps", help="the models a running server has loaded")
    p.add_argument("--url", default=None,
                   help="the server (default: $LOCALSERVE_URL, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $LOCALSERVE_API_KEY)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard("ps", run_ps))


def run_ps(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from localserve.store.progress import format_bytes
    from localserve.store.running import add_store_facts, api_key, running_models, server_url, since
    from localserve.store.store import ModelStore

    models = running_models(args.url or server_url(), args.api_key or api_key())
    add_store_facts(models, ModelStore())
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return 0
    rows = [("NAME", "SIZE", "QUANT", "CONTEXT", "LOADED")]
    for m in models:
        size = format_bytes(m.size) if m.size is not None else "-"
        loaded = since(m.loaded_at) if m.status == "ready" else m.status
        rows.append((m.name, size, m.quantization or "-", str(m.context or "-"), loaded))
    _table(rows)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# -- quantize -----------------------------------------------------------------------------


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="convert a model to another GGUF type and store it",
        description="SRC: a store name, a .gguf file or an HF safetensors folder (gemma3 / llama family). "
        "GGUF sources go to any type gguf-py can encode (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32, ...); "
        "HF folders to F32, F16, BF16 or Q8_0. Afterwards the result is compared with its source on "
        "greedy continuations of a few prompts.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("--to", required=True, metavar="TYPE", help="target type, e.g. Q8_0, Q4_0, F16")
    p.add_argument("--name", help="register as NAME[:TAG] (default: <source>:<TYPE>)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the greedy-agreement check")
    p.add_argument("--check-tokens", type=int, default=16, help="tokens per prompt in the check (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the check")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_guard("quantize", run_quantize))


def run_quantize(args: argparse.Namespace) -> int:
    from localserve.store.progress import ProgressBar, format_bytes
    from localserve.store.quantize import count_values
    from localserve.store.quantize_job import quantize_to_store, resolve_source

    store = _open_store()
    src_path, _ = resolve_source(store, args.src)
    total = count_values(src_path)
    with ProgressBar(total, desc=f"quantize -> {args.to.upper()}", enabled=not args.quiet, unit="weights") as bar:
        outcome = quantize_to_store(store, args.src, args.to, args.name, on_values=bar.update)
    r = outcome.result
    types = ", ".join(f"{k} x{v}" for k, v in sorted(r.types.items()))
    print(f"stored {outcome.manifest.ref}: {format_bytes(r.out_bytes)} (source tensors {format_bytes(r.src_bytes)}; {types})")
    if args.check:
        from localserve.store.quality import check_agreement

        print("checking quality against the source (greedy continuations)...", file=sys.stderr)
        try:
            agreement = check_agreement(str(outcome.source_path), str(r.path), args.check_tokens, args.threads)
        except Exception as e:  # the model is stored either way; the check is a report
            print(f"quality check skipped: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            print(agreement)
    return 0


STORE_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_pull_parser,
    add_ls_parser,
    add_show_parser,
    add_rm_parser,
    add_ps_parser,
    add_quantize_parser,
]
