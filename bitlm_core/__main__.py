"""``python -m bitlm_core``: the ``bitlm`` command (what torchrun runs with ``-m bitlm_core``)."""

from bitlm_core.cli.root import main

main()
