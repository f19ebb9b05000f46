"""What a pull reference points at, and which of a repo's files make the model.

    org/name                 the repo's only GGUF, else its Q4_K_M, else an HF safetensors folder
    org/name:Q4_K_M          the GGUF whose file name carries that quantization label
    org/name:sub/x.gguf      that file
    hf.co/org/name[:...]     the same (Ollama's spelling)
    https://host/x.gguf      a URL (append #sha256=<hex> to have it verified)
    ./model.gguf, ./folder   a local file or HF folder
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from localserve.store.names import normalize_quant, quant_from_filename
from localserve.store.store import StoreError

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
PREFERRED_QUANT = "Q4_K_M"
# the files of an HF model folder worth keeping (weights, config, tokenizer, chat template)
HF_FOLDER_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|"
    r"special_tokens_map\.json|tokenizer\.model|chat_template\.jinja|chat_template\.json|"
    r"model\.safetensors\.index\.json|[^/]+\.safetensors)$"
)


@dataclass(slots=True, frozen=True)
class PullRef:
    kind: str  # "hf" | "url" | "path"
    target: str  # repo id, URL or path
    selector: str | None = None  # hf: a file name or quantization label
    sha256: str | None = None  # url: from a #sha256= fragment


def parse_pull_ref(ref: str) -> PullRef:
    text = ref.strip()
    if text.startswith(("http://", "https://")):
        url, _, frag = text.partition("#")
        sha = frag.removeprefix("sha256=").lower() if frag.startswith("sha256=") else None
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise StoreError(f"bad #sha256= fragment in {ref!r}: expected 64 hex digits")
        return PullRef("url", url, sha256=sha)
    path = Path(text).expanduser()
    if path.exists():
        return PullRef("path", str(path.resolve()))
    for prefix in ("hf.co/", "huggingface.co/", "https://huggingface.co/"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    repo, sep, selector = text.partition(":")
    if _REPO_RE.match(repo) and (not sep or selector):
        return PullRef("hf", repo, selector=selector or None)
    if text.endswith(".gguf") or "/" in text and not _REPO_RE.match(repo):
        raise StoreError(f"no such file or folder: {ref}")
    raise StoreError(
        f"cannot pull {ref!r}: expected a Hugging Face repo (org/name[:Q4_K_M|:file.gguf]), "
        "an http(s) URL or an existing local path"
    )


def select_gguf(repo: str, files: list[str], selector: str | None) -> str | None:
    """The GGUF file to pull among a repo's `files`; None when the repo holds no GGUF."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
    if selector and selector.lower().endswith(".gguf"):
        if selector not in files:
            raise StoreError(f"{repo} has no file {selector!r}" + _available(ggufs))
        return selector
    if not ggufs:
        if selector:
            raise StoreError(f"{repo} has no GGUF files to match {selector!r}")
        return None
    if selector:
        label = normalize_quant(selector)
        if label is None:
            raise StoreError(
                f"{selector!r} is neither a .gguf file name nor a quantization label (e.g. Q4_K_M)"
                + _available(ggufs)
            )
        matches = [f for f in ggufs if quant_from_filename(f) == label]
    elif len(ggufs) == 1:
        matches = ggufs
    else:
        matches = [f for f in ggufs if quant_from_filename(f) == PREFERRED_QUANT]
        if not matches:
            raise StoreError(f"{repo} has several GGUF files: name one" + _available(ggufs))
    if not matches:
        raise StoreError(f"{repo} has no {selector} GGUF" + _available(ggufs))
    whole = [f for f in matches if not _SPLIT_RE.search(f)]
    if not whole:
        raise StoreError(f"{matches[0]} is split into several files; split GGUFs are not supported")
    if len(whole) > 1:
        raise StoreError(f"{repo}: {selector or 'the default'} matches several files" + _available(whole))
    return whole[0]


def hf_folder_files(files: list[str]) -> list[str]:
    picked = sorted(f for f in files if HF_FOLDER_FILES.match(f))
    if "config.json" not in picked or not any(f.endswith(".safetensors") for f in picked):
        return []
    return picked


def _available(ggufs: list[str]) -> str:
    if not ggufs:
        return ""
    labels = sorted({quant_from_filename(f) or f for f in ggufs})
    return f" (available: {', '.join(labels)})"
