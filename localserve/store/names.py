"""Store names (`name:tag`, e.g. `gemma3:270m`, `org/model:Q4_K_M`) and quantization labels.

A name is 1-3 `/`-separated components, a tag one component; both map onto directories of
the manifest tree, so neither may hold `..`, a leading dot or a path separator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType, LlamaFileType

DEFAULT_TAG = "latest"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(rf"^{_PART}(/{_PART}){{0,2}}$")
_TAG_RE = re.compile(rf"^{_PART}$")


class InvalidNameError(ValueError):
    pass


@dataclass(slots=True, frozen=True)
class StoreName:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.name.split("/"))


def _valid(name: str, tag: str) -> bool:
    return (
        bool(_NAME_RE.match(name))
        and bool(_TAG_RE.match(tag))
        and ".." not in name.split("/")
        and not any(p.endswith(".") for p in (*name.split("/"), tag))
    )


def parse_name(text: str, default_tag: str | None = DEFAULT_TAG) -> StoreName:
    """`name[:tag]`; without a tag, `default_tag` (None: the tag stays empty for lookups)."""
    name, sep, tag = text.strip().partition(":")
    if not sep:
        tag = default_tag or ""
    if not _valid(name, tag or "x"):
        raise InvalidNameError(
            f"invalid model name {text!r}: use name[:tag] with letters, digits, '.', '_', '-' "
            "(up to three '/'-separated parts, e.g. gemma3:270m or org/model:Q4_K_M)"
        )
    return StoreName(name, tag)


def is_store_name(text: str) -> bool:
    try:
        parse_name(text)
        return True
    except InvalidNameError:
        return False


# every quantization label llama.cpp uses in file names: tensor types and file types
QUANT_LABELS: frozenset[str] = frozenset(
    {t.name for t in GGMLQuantizationType}
    | {t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in LlamaFileType if t.name != "GUESSED"}
)


def normalize_quant(label: str) -> str | None:
    up = label.strip().upper()
    return up if up in QUANT_LABELS else None


def quant_from_filename(filename: str) -> str | None:
    """The quantization label in a file name like `gemma-3-270m-it-Q4_K_M.gguf` (last one wins)."""
    stem = filename.rsplit("/", 1)[-1]
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    found = None
    for token in re.split(r"[-.]", stem):
        if normalize_quant(token):
            found = normalize_quant(token)
    return found


def file_type_label(file_type: int | None) -> str | None:
    """`general.file_type` (a llama.cpp LlamaFileType) as a label: 15 -> "Q4_K_M"."""
    if file_type is None:
        return None
    try:
        name = LlamaFileType(int(file_type)).name
    except ValueError:
        return None
    return None if name == "GUESSED" else name.removeprefix("MOSTLY_").removeprefix("ALL_")


def split_stem(filename: str) -> tuple[str, str | None]:
    """(model name, quant label) from a GGUF file name: `gemma-3-270m-it-Q4_K_M.gguf` ->
    ("gemma-3-270m-it", "Q4_K_M")."""
    stem = filename.rsplit("/", 1)[-1]
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    quant = quant_from_filename(filename)
    if quant:
        cut = re.split(r"[-.]" + re.escape(quant) + r"$", stem, flags=re.IGNORECASE)
        if len(cut) == 2 and cut[0]:
            stem = cut[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    return name, quant


def clean_part(text: str) -> str:
    """`text` as one valid name component (a folder name: `My Model (v2)` -> `My-Model-v2`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"
