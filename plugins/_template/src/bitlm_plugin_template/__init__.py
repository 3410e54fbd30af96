"""Example bitlm plugin: provides the ``invert`` codec (see :mod:`.codec` and :mod:`.plugin`)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
