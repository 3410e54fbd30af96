"""``bitlm dashboard [RUNS_DIR] [--port N] [--host H --token T]``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

TOKEN_ENV = "BITLM_DASHBOARD_TOKEN"


def dashboard(
    runs_dir: Path = typer.Argument(Path("runs"), help="Folder holding the run folders."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="TCP port (0: any free "
                             "one, printed)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but "
                             "loopback (127.0.0.1, localhost, ::1) needs --token."),
    token: Optional[str] = typer.Option(None, "--token", help="Secret every request must "
                                        f"carry (at least 16 characters; or set {TOKEN_ENV}). "
                                        "Required when --host is not loopback."),
    max_trainings: int = typer.Option(1, "--max-trainings", min=0, max=16, help="Trainings the "
                                      "page may run at once (0: it cannot start any)."),
    verbose: bool = typer.Option(False, "--verbose", help="Log every request on stderr."),
) -> None:
    """A local web page of runs: a sortable table of settings and figures, live curves of
    running runs, overlays with smoothing, comparison at a step, starting a run from another's
    spec, stopping one (it checkpoints), and sampling with the safety gate. Ctrl-C stops it
    (and the trainings it started, each with a checkpoint)."""
    import sys

    from bitlm_core.errors import DataError

    from bitlm_dashboard import assets
    from bitlm_dashboard.server import LOOPBACK, Dashboard

    token = token or os.environ.get(TOKEN_ENV) or None
    if host not in LOOPBACK and token is None:
        raise DataError(f"--host {host} serves the dashboard beyond this machine: give a "
                        f"--token (or set {TOKEN_ENV}) that every request must carry")
    if token is not None and len(token) < 16:
        raise DataError("--token must be at least 16 characters (e.g. the output of "
                        "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    if assets.missing():
        raise DataError(f"the charting library is not installed ({', '.join(assets.missing())} "
                        "missing); run `python -m bitlm_dashboard.assets` once (it downloads "
                        f"uPlot {assets.VERSION} from the npm registry and checks its digest)")
    if not runs_dir.is_dir():
        raise DataError(f"{runs_dir} is not a folder; give the folder that holds your run "
                        "folders (`bitlm run` writes runs/<name> by default)")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        server = Dashboard(runs_dir, host, port, token, max_trainings,
                           log=log if verbose else (lambda m: None), say=log)
    except OSError as exc:
        raise DataError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                        "another --port, or a --host address of this machine") from None
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{server.port}/" + (f"?token={token}" if token else "")
    log(f"bitlm dashboard of {server.runs_dir} at {address} (Ctrl-C stops it)")
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        log("stopping (trainings started here checkpoint first)")
    finally:
        server.server_close()


def dashboard_command():
    """The command's factory (``bitlm_commands``)."""
    return dashboard
