"""bitlm plugin ``compression_pack``: the ``pack`` codec (8 bits per byte, numpy packbits order).

The codec lives in :mod:`bitlm_compression_pack.codec`; :mod:`bitlm_compression_pack.plugin` is
the entry point that registers it with bitlm. Importing this package imports nothing heavy.
"""

__version__ = "0.2.1"

__all__ = ["__version__"]
