"""Show e for benchmarks/scripts/gpu_bench.py: the share of each step the GPU sits idle, gemma-3-270m at
batch 1 and 64, with and without CUDA graphs and overlap scheduling (a mixin of its Show; the
runs and timelines come from gpu_harness.Bench)."""

from __future__ import annotations

import traceback

_TIMELINE = ("gpu_idle_between_steps", "lead_in_ms", "longest_gaps_ms", "first_gaps_ms",
             "idle_after_step_8")


class IdleShow:
    def _idle_pair(self, be, eng, prompt, prompts, n_out: int):
        """One bs1 stream and one bs64 batch, each from a cold prefix cache:
        ((idle, decode tok/s), (idle, output tok/s), the bs64 run's result)."""
        eng.reset_prefix_cache()
        r1, i1 = self.idle_share(be, lambda: self.stream(eng, prompt, n_out))
        eng.reset_prefix_cache()
        r64, i64 = self.idle_share(be, lambda: self.run_batch(eng, prompts, [n_out] * len(prompts)))
        return (round(i1, 4), r1["decode_tok_s"]), (round(i64, 4), r64["output_tok_s"]), r64

    def show_e(self) -> dict:
        """gemma-3-270m: device idle share at batch 1 and 64, CUDA graphs on and off (the
        median run of 3 (idle, tok/s) pairs with graphs), and once without overlap."""
        out = {}
        model = self.models["gemma"]
        for compile in ("auto", "off"):
            be, cfg, _ = self.backend(model, 64, 2048, compile=compile)
            eng, _ = self.engine(be, cfg, 64, 2048)
            key = "graphs" if be.graphs is not None else "eager"
            n_out = 16 if self.cpu else 256
            p = self.rand_prompts(cfg.vocab_size, [128 if not self.cpu else 12] * 64, 5)
            self.stream(eng, p[0], 8)
            # warm-up in the measured shape: the first 64-row batch in a process pays one-time
            # costs at its start and end (gaps of 14-18 ms between its last steps, in no later run)
            self.run_batch(eng, p, [8] * 64)
            # a gemma step is ~1 ms, so a host hiccup moves one run's share by points: the
            # median of 3 runs each (graphs), 1 run eager
            runs1, runs64, between64 = [], [], []
            for _ in range(3 if key == "graphs" else 1):
                one, many, r64 = self._idle_pair(be, eng, p[0], p, n_out)
                runs1.append(one)
                runs64.append(many)
                between64.append({k: r64.get(k) for k in _TIMELINE})
            med1, med64 = sorted(runs1)[len(runs1) // 2], sorted(runs64)[len(runs64) // 2]
            out[key] = {"bs1_idle": med1[0], "bs1_decode_tok_s": med1[1],
                        "bs64_idle": med64[0], "bs64_output_tok_s": med64[1],
                        "bs1_runs": runs1, "bs64_runs": runs64, "bs64_timeline": between64,
                        "attention": be.attention_name, "fused": be.model.fused,
                        "overlap": eng.async_scheduling}
            if eng.async_scheduling:  # and once without overlap: each step waits for its ids
                eng.async_scheduling = False
                try:
                    one, many, _ = self._idle_pair(be, eng, p[0], p, n_out)
                    out[key]["no_overlap"] = {
                        "bs1_idle": one[0], "bs1_decode_tok_s": one[1],
                        "bs64_idle": many[0], "bs64_output_tok_s": many[1]}
                finally:
                    eng.async_scheduling = True
            if compile == "auto" and be.graphs is not None and not self.cpu:
                try:
                    out[key]["bs1_replay"] = self.replay_timing(be, 1, 128 + n_out // 2, True)
                    out[key]["bs64_replay"] = self.replay_timing(be, 64, 128 + n_out // 2, True)
                except Exception as exc:
                    traceback.print_exc()
                    out[key]["replay_error"] = f"{type(exc).__name__}: {exc}"
            self.log(key, out[key])
            self.free(be)
            eng = be = None
            self.free()
            if self.left() < 40:
                break
        out["target"] = "idle < 0.10"
        return out

    def show_e_profiled(self) -> dict:
        """e again (graphs on) with the host parts of each step timed."""
        out = {}
        be, cfg, _ = self.backend(self.models["gemma"], 64, 2048)
        eng, _ = self.engine(be, cfg, 64, 2048)
        n_out = 16 if self.cpu else 256
        p = self.rand_prompts(cfg.vocab_size, [128 if not self.cpu else 12] * 64, 5)
        self.stream(eng, p[0], 8)
        (r1, h1), i1 = self.idle_share(be, lambda: self.host_breakdown(
            eng, lambda: self.stream(eng, p[0], n_out)))
        eng.reset_prefix_cache()
        self.run_batch(eng, p[:8], [4] * 8)
        eng.reset_prefix_cache()
        (r64, h64), i64 = self.idle_share(be, lambda: self.host_breakdown(
            eng, lambda: self.run_batch(eng, p, [n_out] * 64)))
        out["graphs"] = {"bs1_idle": round(i1, 4), "bs1_decode_tok_s": r1["decode_tok_s"],
                         "bs1_host_ms_per_step": h1, "bs64_idle": round(i64, 4),
                         "bs64_output_tok_s": r64["output_tok_s"], "bs64_host_ms_per_step": h64}
        self.free(be)
        eng = be = None
        self.free()
        return out
