"""Bench prompts as token ids, identical for every engine in a run.

Both engines get the same ids (never each its own tokenization), so they do the same work.
"Fresh" prompts start with a word no earlier prompt of the run started with: after BOS they
share no prefix with anything cached, in localserve's radix cache or llama.cpp's KV reuse.
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Sequence

DECODE_TEXT = "1, 2, 3, 4, 5, 6,"

# Leading words of fresh prompts: distinct first tokens for the first len(_LEADS) prompts,
# then a numbered suffix keeps the prompts distinct (the first token may repeat, which only
# lets one token of 2,000 be shared).
_LEADS = (
    "Amber Birch Cobalt Delta Ember Fjord Garnet Harbor Indigo Juniper Kestrel Lantern Meadow "
    "Nectar Orchid Pebble Quartz Raven Saffron Thistle Umber Velvet Willow Xenon Yarrow Zephyr "
    "Anchor Bramble Canyon Dune Falcon Glacier Heron Island Jasper Kelp Lagoon Maple Nimbus Otter "
    "Prairie Quill Reef Sparrow Tundra Valley Walnut Alder Basil Cedar Dahlia Egret Fennel Ginger "
    "Hazel Iris Jade Kiwi Lilac Mango Nutmeg Olive Poppy Rowan Sage Tulip Violet Wren Acorn Beacon "
    "Comet Drizzle Echo Flint Grove Hollow Ivory Jetty Knoll Ledge Marble Nova Oasis Pine Ripple "
    "Summit Timber Vapor Wharf Aurora Blossom Cascade Dawn Ember Frost Gale Horizon"
).split()

_WORDS = (
    "the of and to in is was for on are with as his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how "
    "up out them then she many some so these would other into has more her two like him see time "
    "could no make than first been its who now people my made over did down only way find use may "
    "water long little very after words called just where most know get through back much before "
    "go good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why things help "
    "put years different away again off went old number great tell men say small every found still "
    "between name should home big give air line set own under read last never us left end along while "
    "might next sound below saw something thought both few those always looked show large often "
    "together asked house don't world going want school important until form food keep children feet "
    "land side without boy once animals life enough took sometimes four head above kind began almost "
    "live page got earth need far hand high year mother light parts country father let night following "
    "picture being study second eyes soon times story boys since white days ever paper hard near sentence "
    "better best across during today others however sure means knew it's try told young miles sun ways "
    "thing whole hear example heard several change answer room sea against top turned learn point city "
    "play toward five using himself usually"
).split()


class TextEncoder:
    """text -> token ids without BOS; a hashing fallback stands in for models without a tokenizer."""

    def __init__(self, encode: Callable[[str], Sequence[int]] | None, vocab_size: int, bos_token_id: int | None):
        self._encode = encode
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id

    def __call__(self, text: str) -> list[int]:
        if self._encode is None:
            return self._hash_encode(text)
        ids = list(self._encode(text))
        if ids and self.bos_token_id is not None and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return ids

    def _hash_encode(self, text: str) -> list[int]:
        # keep clear of the low ids, where tiny presets put pad/bos/eos
        low = min(16, self.vocab_size // 2)
        span = self.vocab_size - low
        return [low + zlib.crc32(w.encode()) % span for w in text.replace(",", " ,").split()]


class PromptFactory:
    """Builds the run's prompts; every call to a `fresh_*` method gives a never-seen prefix."""

    def __init__(self, encoder: TextEncoder, seed: int = 0):
        self.encoder = encoder
        self._rng = random.Random(seed)
        self._num_fresh = 0

    def bos(self) -> list[int]:
        bos = self.encoder.bos_token_id
        return [] if bos is None else [bos]

    def header(self) -> list[int]:
        """A fresh first line; the next prompts of the run never start with it."""
        k = self._num_fresh
        self._num_fresh += 1
        lead = _LEADS[k % len(_LEADS)]
        suffix = f" {k // len(_LEADS)}" if k >= len(_LEADS) else ""
        return self.encoder(f"{lead}{suffix} notes.\n")

    def filler(self, num_tokens: int, rng: random.Random | None = None) -> list[int]:
        """Exactly num_tokens ids of plain sentences of common words."""
        rng = rng or self._rng
        ids: list[int] = []
        while len(ids) < num_tokens:
            sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16)))
            ids += self.encoder(sentence.capitalize() + ". ")
        return ids[:num_tokens]

    def decode_prompt(self) -> list[int]:
        """The decode stream's prompt; the same every call (only decode rate is read from it)."""
        return self.bos() + self.encoder(DECODE_TEXT)

    def fresh_short(self) -> list[int]:
        return self.bos() + self.header() + self.encoder(DECODE_TEXT)

    def fresh_exact(self, num_tokens: int) -> list[int]:
        """A fresh prompt of exactly num_tokens ids (BOS included)."""
        ids = self.bos() + self.header()
        ids += self.filler(max(num_tokens - len(ids), 0))
        return ids[:num_tokens]

    def fresh_questions(self, n: int) -> list[list[int]]:
        """n distinct short prompts (the concurrent requests)."""
        topics = self._rng.sample(_WORDS, n) if n <= len(_WORDS) else [self._rng.choice(_WORDS) for _ in range(n)]
        return [
            self.bos() + self.header() + self.encoder(f"Write a short story about {t}.") for t in topics
        ]

    def system_prompt(self, num_tokens: int) -> list[int]:
        """A fixed (seeded) system text of exactly num_tokens ids, without BOS."""
        intro = self.encoder("You are a careful assistant. Follow every rule below.\n")
        return (intro + self.filler(num_tokens, random.Random(1234)))[:num_tokens]

    def question(self, i: int) -> list[int]:
        return self.encoder(f"\nQuestion {i}: what does rule {i + 3} say?\n")
