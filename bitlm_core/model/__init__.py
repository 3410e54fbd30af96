"""The model: configuration, layers, the two layouts, decoding and growth.

``BitTransformerLM(cfg, backend)`` builds the layout ``cfg.layout`` names
(:class:`~bitlm_core.model.flat.FlatBitLM` or :class:`~bitlm_core.model.framed.FramedBitLM`,
both subclasses of it). Modules, bottom up: ``config`` (:class:`ModelConfig`, token values),
``layers`` (attention, feed-forward, block, initialisation), ``local`` (the framed layout's bit
predictors), ``base`` (the shared backbone), ``flat`` and ``framed`` (each layout's forward and
cached decoder), ``decoding`` (decoder base, the uncached reference, bit choice), ``growth``
(more layers, wider feed-forward, longer context, all without changing the outputs).

This layer knows nothing of run specs, plugins or files; it imports only torch and
:mod:`bitlm_core.errors`.
"""

from bitlm_core.model.base import BitTransformerLM, layout_class
from bitlm_core.model.config import BOS, LAYOUTS, LOCALS, MASK, ModelConfig
from bitlm_core.model.decoding import CachedDecoder, FullForwardDecoder
from bitlm_core.model.flat import FlatBitLM
from bitlm_core.model.framed import FramedBitLM
from bitlm_core.model.layers import Block, eval_mode
from bitlm_core.model.local import JointBitPredictor, LocalBitPredictor, TreeBitPredictor

__all__ = ["BOS", "LAYOUTS", "LOCALS", "MASK", "BitTransformerLM", "Block", "CachedDecoder",
           "FlatBitLM", "FramedBitLM", "FullForwardDecoder", "JointBitPredictor",
           "LocalBitPredictor", "ModelConfig", "TreeBitPredictor", "eval_mode", "layout_class"]
