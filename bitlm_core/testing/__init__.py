"""Contract checks for plugin authors, reused by bitlm's own tests.

Call them from your plugin's tests::

    from bitlm_core.testing import check_codec_contract
    def test_my_codec():
        check_codec_contract(MyCodec())

Submodules: :mod:`.strategies` (hypothesis strategies for bits and bytes), :mod:`.codecs`
(round trips, determinism, hostile streams), :mod:`.attention` (agreement with ``reference``),
:mod:`.encoders` (byte <-> bit round trips), :mod:`.components` (telemetry metrics, safety
gates, scaling strategies, objectives, samplers, corpora, training callbacks, commands): a
check for every kind a plugin can provide. Importing this package needs torch, numpy and
hypothesis (install bitlm-core with the ``test`` extra).
"""

from bitlm_core.testing.strategies import *  # noqa: F401,F403
from bitlm_core.testing.encoders import *  # noqa: F401,F403
from bitlm_core.testing.codecs import *  # noqa: F401,F403
from bitlm_core.testing.attention import *  # noqa: F401,F403
from bitlm_core.testing.components import *  # noqa: F401,F403
