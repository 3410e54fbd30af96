"""What bitlm keeps on disk: atomic files, checkpoints, the int8 weight format, run folders.

``atomic`` (write beside, fsync, rename), ``checkpoint`` (safetensors weights and optimizer
state plus JSON metadata; nothing is ever unpickled), ``quantized`` (the ``int8-rowwise``
format that ``bitlm quantize`` writes and every loader reads), ``rundir`` (the run folder's
layout, its metrics log, the checks before writing into one). This layer imports no model code:
it saves and loads whatever module it is given.
"""
