"""bitlm plugin: the ``sdpa`` attention backend (torch ``scaled_dot_product_attention``).

The backend class lives in :mod:`bitlm_attention_sdpa.backend`; :mod:`bitlm_attention_sdpa.plugin`
registers it with bitlm. Importing this package does not import torch.
"""

__version__ = "0.2.0"
