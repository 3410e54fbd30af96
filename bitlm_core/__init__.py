"""bitlm: a plugin-based toolkit for bit-native transformer language models.

The core is layered; a module imports only from the layers below its own (checked by
import-linter, see pyproject.toml), from the top: ``testing``, ``builtins`` (core's own
components, registered like a plugin's), ``cli``, ``app`` (what the commands do), ``engine``
(training loop, callbacks, evaluation), ``store`` and ``model``, ``components``, ``registry``,
``plugins`` and ``spec``, then what plugins import (``hookspecs``, ``records``, ``interfaces``,
``codecs``, ``bits``, ``errors``).

Importing this package is cheap: torch and numpy are imported only by the modules that need
them (the model, the engine, encoders), never on the CLI's start-up path.
"""

__version__ = "0.2.0"

from bitlm_core.errors import BitlmError  # noqa: E402

__all__ = ["BitlmError", "__version__"]
