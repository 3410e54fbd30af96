"""What the ``bitlm`` commands do, without the CLI around them.

``run`` (train, resume, evaluate, sample: :func:`~bitlm_core.app.run.execute`), ``loading``
(:func:`~bitlm_core.app.loading.load_run`), ``evaluate`` (``bitlm eval``), ``generate``
(samples, gates, retries), ``quantize`` (``bitlm quantize``), ``codec`` (``bitlm codec``),
``build`` (a spec's model) and ``textstats``. Everything here can be called from Python; the
CLI adds argument parsing, progress bars and error messages.
"""
