"""bitlm-compress: ``bitlm compress`` and ``bitlm decompress``, a run's model driving a range
coder (constriction) over the probabilities of :mod:`bitlm_core.app.coding`."""
