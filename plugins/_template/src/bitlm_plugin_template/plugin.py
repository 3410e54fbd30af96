"""The plugin's entry point: the only module that knows about pluggy.

bitlm loads this module through the entry point in ``pyproject.toml`` and calls every function
marked ``@hookimpl`` whose name is a hook spec (see ``bitlm_core.hookspecs``). Each hook yields
records; the record's ``factory`` is called later with the run spec's ``options``.
"""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CompressorSpec


@hookimpl
def bitlm_compressors():
    # Import the implementation inside the hook, so that listing plugins stays cheap.
    from bitlm_plugin_template.codec import InvertCodec

    yield CompressorSpec("invert", InvertCodec, "example: one inverted bit per byte (expands 8x)")
