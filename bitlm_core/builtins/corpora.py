"""Built-in corpora: ``quickstart`` (embedded English text) and ``file`` (any text file)."""

from __future__ import annotations

import gzip
import zlib
from importlib import resources
from pathlib import Path

from bitlm_core.errors import DataError

QUICKSTART_RESOURCE = "quickstart.txt.gz"
DEFAULT_LIMIT = 256 << 20  # bytes of text a corpus may hold unless max_bytes says otherwise


class QuickstartCorpus:
    """About 1 MB of Jane Austen (public domain), shipped inside bitlm-core, gzip-compressed."""

    name = "quickstart"

    def read(self) -> bytes:
        ref = resources.files("bitlm_core.data").joinpath(QUICKSTART_RESOURCE)
        return gzip.decompress(ref.read_bytes())


class FileCorpus:
    """A text file on disk; ``.gz`` files are decompressed as they are read.

    ``max_bytes`` keeps the first that many bytes of the text. Without it, a corpus may hold up
    to :data:`DEFAULT_LIMIT` bytes (after decompression) and a larger one is refused: reading
    stops there, so a small gzip file holding gigabytes cannot exhaust the machine. Encoding a
    corpus for training takes about 9 bytes of memory per byte of text, once.
    """

    name = "file"

    def __init__(self, path: str, max_bytes: int | None = None):
        if not isinstance(path, str) or not path:
            raise ValueError("option 'path' must name a text file")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(
                max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.path = Path(path).expanduser()
        self.max_bytes = max_bytes

    def read(self) -> bytes:
        if self.path.is_dir():
            raise DataError(f"corpus path {self.path} is a folder; set data.corpus.options.path "
                            "to a text file")
        if not self.path.is_file():
            raise DataError(f"corpus file not found: {self.path} (set data.corpus.options.path "
                            "to an existing text file; a relative path is read from the folder "
                            "bitlm runs in)")
        limit = self.max_bytes or DEFAULT_LIMIT
        try:
            opener = gzip.open if self.path.suffix == ".gz" else open
            with opener(self.path, "rb") as f:  # never more than the limit is decompressed
                data = f.read(limit if self.max_bytes else limit + 1)
        except (OSError, EOFError, zlib.error) as exc:
            kind = "valid gzip" if self.path.suffix == ".gz" else "readable"
            raise DataError(f"corpus file {self.path} is not {kind}: {exc}") from None
        if len(data) > limit:
            raise DataError(f"corpus {self.path} holds more than {limit:,} bytes"
                            f"{' once decompressed' if self.path.suffix == '.gz' else ''}; set "
                            "data.corpus.options.max_bytes to train on that many of its first "
                            "bytes (about 9 bytes of memory each while encoding)")
        return data
