"""Workloads for `localserve bench --serving`: request lengths, prompts and arrival times, all from
fixed seeds, so two runs (or two servers) get the very same requests.

Datasets:
* `random`: input and output lengths fixed (`128`) or uniform in a range (`64:256`, inclusive).
* `sharegpt-like`: the real ShareGPT file is not reachable here, so lengths come from a synthetic
  distribution shaped like it: input and output lengths each drawn from a lognormal (input median
  150 tokens, sigma 1.2; output median 150, sigma 0.75), and draws outside vLLM's ShareGPT filter
  (4 <= input <= 1024, output >= 4, input + output <= 2048) drawn again. The medians are set so
  that the means match what vLLM's ShareGPT V3 sample gives with a Llama tokenizer (1,000 prompts,
  seed 0: 215,196 input tokens, about 198k output tokens): 214 and 198 here; the sigmas (the
  spread) are our assumption, not fitted to the file.

`prefix-repetition` (vLLM's dataset of that name): num_prefixes random prefixes of prefix_len tokens,
the prompts spread evenly over them, each its prefix and then a question of input_len tokens of its
own, in a shuffled order (as requests of many conversations arrive): what a prefix cache is for.

Prompts are token-id lists (exact lengths; the only choice for a model without a tokenizer, such as
`random:llama-3.1-8b`) or text made of common English words (for models with a tokenizer, and
always for the chat endpoint), scaled by a measured words-per-token ratio; the server's `usage`
gives the exact count either way. Every prompt starts differently, so no two share a cached prefix
beyond their first token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from localserve.bench.serving_config import DATASETS


# the sharegpt-like distribution: (median, sigma) of each lognormal, and vLLM's ShareGPT filter
SHAREGPT_INPUT = (150.0, 1.2)
SHAREGPT_OUTPUT = (150.0, 0.75)
SHAREGPT_MAX_INPUT = 1024
SHAREGPT_MAX_TOTAL = 2048
SHAREGPT_MIN = 4

# words that are one token in most BPE vocabularies (a leading space included)
_WORDS = (
    "the of and to in is was for on are with as his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write our "
    "used me man too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different away again "
    "off went old number great tell men say small every found still between name should home big give "
    "air line set own under read last never us left end along while might next sound below saw "
    "something thought both few those always looked show large often together asked house world going "
    "want school important until form food keep children feet land side without boy once animals life "
    "enough took four head above kind began almost live page got earth need far hand high year mother "
    "light country father let night picture being study second soon story since white ever paper hard "
    "near sentence better best across during today however sure knew try told young sun thing whole "
    "hear example heard several change answer room sea against top turned learn point city play toward "
    "five himself usually"
).split()


def sample_lengths(dataset: str, n: int, input_len: tuple[int, int], output_len: tuple[int, int],
                   seed: int) -> tuple[list[int], list[int]]:
    """n (input, output) token lengths from the dataset's distribution."""
    rng = np.random.default_rng(seed)
    if dataset in ("random", "prefix-repetition"):  # prefix-repetition: the questions' lengths
        ins = rng.integers(input_len[0], input_len[1] + 1, n)
        outs = rng.integers(output_len[0], output_len[1] + 1, n)
        return ins.tolist(), outs.tolist()
    if dataset != "sharegpt-like":
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    ins_acc: list[int] = []
    outs_acc: list[int] = []
    while len(ins_acc) < n:
        a = np.rint(rng.lognormal(np.log(SHAREGPT_INPUT[0]), SHAREGPT_INPUT[1], n)).astype(np.int64)
        b = np.rint(rng.lognormal(np.log(SHAREGPT_OUTPUT[0]), SHAREGPT_OUTPUT[1], n)).astype(np.int64)
        ok = (a >= SHAREGPT_MIN) & (a <= SHAREGPT_MAX_INPUT) & (b >= SHAREGPT_MIN) & (a + b <= SHAREGPT_MAX_TOTAL)
        ins_acc += a[ok].tolist()
        outs_acc += b[ok].tolist()
    return ins_acc[:n], outs_acc[:n]


def token_prompts(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids, exactly lengths[i] each, clear of the low ids where small vocabularies
    keep pad/bos/eos. Their first ids differ, so prompts share no cached prefix."""
    rng = np.random.default_rng(seed + 1_000_003)
    low = min(16, vocab_size // 4)
    firsts = rng.permutation(np.arange(low, vocab_size))
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(low, vocab_size, n)
        ids[0] = firsts[i % len(firsts)]
        out.append(ids.tolist())
    return out


def text_prompts(lengths: list[int], seed: int, words_per_token: float = 1.0) -> list[str]:
    """Text of about lengths[i] tokens: a numbered first line, so prompts share no prefix past it,
    then random common words."""
    rng = random.Random(seed + 2_000_003)
    out = []
    for i, n in enumerate(lengths):
        head = f"Request {i}:"
        words = max(0, round(n * words_per_token) - 3)
        out.append(head + "".join(" " + rng.choice(_WORDS) for _ in range(words)))
    return out


def calibration_text(num_words: int = 400, seed: int = 7) -> str:
    """A sample of the text prompts' words, to count tokens per word on the served model."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


def shared_prefixes(prompts: list, num_prefixes: int, prefix_len: int, fmt: str, vocab_size: int, seed: int,
                    words_per_token: float = 1.0) -> tuple[list, list[int]]:
    """prefix-repetition: each prompt (the question) behind one of num_prefixes shared prefixes,
    prompt i on prefix i % num_prefixes, then shuffled. Returns the prompts and their order (the
    question each came from), so lengths can follow them."""
    if fmt == "ids":
        prefixes = token_prompts([prefix_len] * num_prefixes, vocab_size, seed + 4_000_037)
    else:
        prefixes = [p + "\n" for p in text_prompts([prefix_len] * num_prefixes, seed + 4_000_037, words_per_token)]
    order = np.random.default_rng(seed + 5_000_011).permutation(len(prompts)).tolist()
    return [prefixes[i % num_prefixes] + prompts[i] for i in order], order


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds after the start) for n requests: all at 0 for rate inf, else a Poisson
    process (exponential gaps of mean 1/rate), the first request at 0."""
    if rate == float("inf"):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("the request rate must be positive (or inf)")
    rng = random.Random(seed + 3_000_017)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass(slots=True)
class Workload:
    """What the clients send: prompt i with max_tokens output_lens[i] at arrivals[i] seconds."""

    prompts: list  # list[list[int]] or list[str]
    input_lens: list[int]  # the target lengths (exact for token ids)
    output_lens: list[int]
    arrivals: list[float]

    def __len__(self) -> int:
        return len(self.prompts)
