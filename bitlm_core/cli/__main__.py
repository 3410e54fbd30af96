"""``python -m bitlm_core.cli``: the ``bitlm`` command."""

from bitlm_core.cli.app import main

main()
