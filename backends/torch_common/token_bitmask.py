"""Grammar token bitmasks applied to logits: xgrammar's packed int32 masks (bit t % 32 of word
t // 32 allows token t) turn the tokens a row's grammar disallows to -inf before sampling."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from localserve.engine.plan import SamplingRow


def apply_token_bitmask(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logits with the tokens each row's `token_bitmask` disallows set to -inf: a new tensor
    when some row has a mask (logits itself is not modified), else logits unchanged.

    The packed masks ([M, ceil(V / 32)] int32, 32 KiB a row for a 262k vocabulary) go to the
    device as they are and are unpacked there by shifts, with no loop over the vocabulary.
    fp32 logits on the CPU take `_apply_bitmask_host` instead."""
    idx = [i for i, r in enumerate(rows) if r.token_bitmask is not None]
    if not idx:
        return logits
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return _apply_bitmask_host(logits, rows, idx)
    num, vocab = logits.shape
    packed = torch.from_numpy(np.stack([rows[i].token_bitmask for i in idx])).to(logits.device)
    allowed = unpack_bitmask(packed, vocab)
    if len(idx) == num:
        return logits.masked_fill(~allowed, float("-inf"))
    sel = torch.as_tensor(idx, dtype=torch.long, device=logits.device)
    out = logits.clone()
    out[sel] = logits[sel].masked_fill(~allowed, float("-inf"))
    return out


# a mask with at most this share of its words non-zero counts as sparse
_SPARSE_WORDS = 1 / 16
# by byte value of a mask: per bit, the uint32 to AND a logit's bits with (keep or clear) and
# the one to OR in after (0 or the bits of -inf), so a select is two gathers and two bit ops
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(bool)
_KEEP = np.where(_BYTE_BITS, np.uint32(0xFFFFFFFF), np.uint32(0))
_FILL = np.where(_BYTE_BITS, np.uint32(0), np.float32(-np.inf).view(np.uint32))


def _apply_bitmask_host(logits: torch.Tensor, rows: Sequence[SamplingRow], idx: list[int]) -> torch.Tensor:
    """apply_token_bitmask for fp32 CPU logits, in numpy, row by row, on the calling thread.

    Work: most masks of a JSON grammar allow a handful of tokens (a key, a quote, a digit), so a
    sparse row is written as -inf with its few allowed logits copied in; a dense row (string
    content) is a branch-free select through per-byte tables (np.where over a random bool mask
    runs ~6x slower on branch mispredictions). Threads: torch's parallel elementwise ops wait
    for every worker at the end of each op, so on a busy 2-core machine one descheduled worker
    costs a whole time slice per op (measured: 20-60 ms for the [1, 262144] unpack-and-fill
    path under load); numpy here stays on the calling thread."""
    x = np.ascontiguousarray(logits.detach().numpy())
    num, vocab = x.shape
    out = np.empty_like(x)
    masked = set(idx)
    neg_inf = np.float32(-np.inf)
    for r in range(num):
        if r not in masked:
            out[r] = x[r]
            continue
        words = np.asarray(rows[r].token_bitmask).astype("<i4", copy=False)
        n = min(vocab, 32 * len(words))  # tokens past the mask are disallowed
        out[r, n:] = neg_inf
        nz = np.flatnonzero(words)
        if len(nz) <= _SPARSE_WORDS * len(words):
            out[r, :n] = neg_inf
            bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(len(nz), 32)
            tok = (nz[:, None] * 32 + np.arange(32))[bits.view(bool)]
            tok = tok[tok < n]
            out[r, tok] = x[r, tok]
        else:
            b = words.view(np.uint8)
            o = out[r, :n].view(np.uint32)
            np.bitwise_and(x[r, :n].view(np.uint32), _KEEP.take(b, axis=0).reshape(-1)[:n], out=o)
            np.bitwise_or(o, _FILL.take(b, axis=0).reshape(-1)[:n], out=o)
    return torch.from_numpy(out)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [M, vocab_size] from xgrammar's packed int32 [M, W] (bit t % 32 of word t // 32);
    tokens past the mask's 32 * W are disallowed."""
    shifts = _BIT_SHIFTS.get(packed.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[packed.device] = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).view(packed.shape[0], -1).bool()
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros(bits.shape[0], vocab_size - bits.shape[1], dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)
