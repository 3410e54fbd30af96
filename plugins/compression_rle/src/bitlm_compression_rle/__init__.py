"""bitlm plugin ``compression_rle``: the ``rle`` codec (run lengths as LEB128 varints).

The codec lives in :mod:`bitlm_compression_rle.codec`; :mod:`bitlm_compression_rle.plugin` is
the entry point that registers it with bitlm. Importing this package imports nothing heavy.
"""

__version__ = "0.1.1"

__all__ = ["__version__"]
