"""Built-in corpora: ``quickstart`` (embedded English text) and ``file`` (any text file)."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

from bitlm_core.errors import DataError

QUICKSTART_RESOURCE = "quickstart.txt.gz"


class QuickstartCorpus:
    """About 1 MB of Jane Austen (public domain), shipped inside bitlm-core, gzip-compressed."""

    name = "quickstart"

    def read(self) -> bytes:
        ref = resources.files("bitlm_core.data").joinpath(QUICKSTART_RESOURCE)
        return gzip.decompress(ref.read_bytes())


class FileCorpus:
    """A text file on disk; ``.gz`` files are decompressed. ``max_bytes`` keeps a prefix."""

    name = "file"

    def __init__(self, path: str, max_bytes: int | None = None):
        if not isinstance(path, str) or not path:
            raise ValueError("option 'path' must name a text file")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = Path(path).expanduser()
        self.max_bytes = max_bytes

    def read(self) -> bytes:
        if not self.path.is_file():
            raise DataError(f"corpus file not found: {self.path} (set data.corpus.options.path "
                            "to an existing text file)")
        raw = self.path.read_bytes()
        if self.path.suffix == ".gz":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise DataError(f"corpus file {self.path} is not valid gzip: {exc}") from None
        return raw[: self.max_bytes] if self.max_bytes else raw
