"""``bitlm run --nproc N``: start the same command in N processes on this machine, through
torchrun's own launcher (``torch.distributed.launcher``, what ``torchrun --standalone`` runs).

The launcher runs in this process; each worker is ``python -m bitlm_core run ...`` without
``--nproc``. When a worker fails, the launcher stops the others (SIGTERM, then SIGKILL after
:data:`SHUTDOWN_SECONDS`) and this command names the worker and how it ended.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from typing import Sequence

SHUTDOWN_SECONDS = 60  # what a stopping worker gets to save its checkpoint before SIGKILL


def worker_args(argv: Sequence[str]) -> list[str]:
    """``argv`` (this command's arguments after the program) without ``--nproc N`` /
    ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def consequence(code: int) -> bool:
    """Whether a worker's exit looks like the result of another's failure: stopped by the
    launcher (SIGTERM), or ended by bitlm on losing a peer (exit status 1)."""
    return code in (1, -signal.SIGTERM)


def free_port() -> int:
    """A TCP port free on the loopback interface now (for the job's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m bitlm_core <args>`` in ``nproc`` processes; the job's exit status (0
    when every worker succeeded). Prints which worker ended the job and how."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from bitlm_core.cli.errors import err

    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun does; train.threads chooses
    # the launcher's own log lines (which worker failed, with tracebacks): said below instead
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # a static rendezvous on the loopback interface: one machine, and no rendezvous state that
    # a peer on the network could send (the dynamic one is exchanged as pickles)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          rdzv_configs={"rank": 0}, run_id=str(uuid.uuid4()), max_restarts=0,
                          shutdown_timeout=SHUTDOWN_SECONDS)
    try:
        elastic_launch(config, sys.executable)("-m", "bitlm_core", *args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        if any(f.exitcode == 2 for _, f in failures):  # bad input: the worker said why
            return 2
        rank, first = min(failures, key=lambda kv: (consequence(kv[1].exitcode),
                                                     kv[1].timestamp, kv[0]))
        others = [f"rank {r} {describe_exit(f.exitcode)}" for r, f in failures if r != rank]
        err.print(f"[bold red]error:[/] the job of {nproc} processes ended: rank {rank} "
                  f"{describe_exit(first.exitcode)}"
                  + (f" (then {', '.join(others)})" if others else "")
                  + ". Run the same command again to resume from the last complete "
                  "checkpoint.", markup=True, soft_wrap=True)
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    except SignalException as exc:  # Ctrl-C or SIGTERM here: the workers were told, and saved
        return 128 + int(exc.sigval)
    return 0
