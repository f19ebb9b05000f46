"""A manifest: what one `name:tag` is made of (blobs by sha256) and what it is (format, facts).

Manifests are small JSON files; the blobs they name hold the bytes. `files[i].path` is the
file's name inside the model (`model.gguf`, or `config.json`, `model.safetensors`, ... for a
Hugging Face folder); `external` is set only for a file the store references in place
instead of holding a blob (the embedded default when a hard link is impossible).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = 1
FORMATS = ("gguf", "hf")


@dataclass(slots=True)
class ManifestFile:
    path: str
    sha256: str
    size: int
    external: str | None = None


@dataclass(slots=True)
class Manifest:
    name: str
    tag: str
    format: str  # "gguf" | "hf"
    files: list[ManifestFile]
    architecture: str = ""
    parameters: int = 0
    quantization: str = ""
    context: int = 0
    source: str = ""  # where it came from: hf://org/repo@rev/file, a URL, a path, quantize:...
    created: str = ""  # ISO 8601, UTC
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.format in FORMATS, self.format
        assert self.files, "a manifest names at least one file"

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digests(self) -> set[str]:
        return {f.sha256 for f in self.files if f.external is None}

    def to_json(self) -> str:
        data = asdict(self)
        data["schema"] = SCHEMA
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if data.pop("schema", None) != SCHEMA:
            raise ValueError("unknown manifest schema")
        data["files"] = [ManifestFile(**f) for f in data["files"]]
        return cls(**data)
