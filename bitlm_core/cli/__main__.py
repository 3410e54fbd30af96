"""``python -m bitlm_core.cli``: the ``bitlm`` command."""

from bitlm_core.cli.root import main

main()
