"""bitlm: a plugin-based toolkit for bit-native transformer language models.

Importing this package is cheap: torch and numpy are imported only by the modules that
need them (model, training, encoders), never by the CLI's start-up path.
"""

__version__ = "0.2.0"

from bitlm_core.errors import BitlmError  # noqa: E402

__all__ = ["BitlmError", "__version__"]
