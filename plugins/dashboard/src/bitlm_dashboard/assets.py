"""The charting library, uPlot (MIT licence, https://github.com/leeoniya/uPlot), as static files.

It is not part of this repository: ``python -m bitlm_dashboard.assets`` (run by ``make
install``) downloads the published npm package once, checks it against the SHA-512 the registry
publishes for it (:data:`INTEGRITY`), and keeps its minified script, style sheet and licence in
``static/vendor/``. The dashboard serves them from there; the page loads nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
from pathlib import Path

VERSION = "1.6.32"
URL = f"https://registry.npmjs.org/uplot/-/uplot-{VERSION}.tgz"
INTEGRITY = ("sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/"
             "ep3tOkyTxpiQIw==")  # `npm view uplot@1.6.32 dist.integrity`
FILES = {"package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
         "package/dist/uPlot.min.css": "uPlot.min.css", "package/LICENSE": "uPlot.LICENSE"}
VENDOR = Path(__file__).parent / "static" / "vendor"
MAX_DOWNLOAD = 4 << 20


def missing() -> list[str]:
    return [name for name in FILES.values() if not (VENDOR / name).is_file()]


def fetch(url: str = URL) -> list[Path]:
    """Download uPlot, check its digest, and write its files into ``static/vendor``."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read(MAX_DOWNLOAD + 1)
    if len(data) > MAX_DOWNLOAD:
        raise RuntimeError(f"{url} is larger than {MAX_DOWNLOAD >> 20} MiB; not uPlot")
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")
    if digest != INTEGRITY:
        raise RuntimeError(f"{url} does not match the published digest ({digest} != "
                           f"{INTEGRITY}); not installed")
    VENDOR.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member, name in FILES.items():
            extracted = tar.extractfile(member)  # by exact name: no path from the archive used
            if extracted is None:
                raise RuntimeError(f"{url} has no {member}")
            (VENDOR / name).write_bytes(extracted.read())
            written.append(VENDOR / name)
    return written


def main() -> int:
    if not missing() and "--force" not in sys.argv:
        print(f"uPlot {VERSION} is in {VENDOR}")
        return 0
    for path in fetch():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
