"""``bitlm mcp [RUNS_DIR]``."""

from __future__ import annotations

from pathlib import Path

import typer


def mcp(
    runs_dir: Path = typer.Argument(Path("runs"), help="Folder holding the run folders."),
    max_trainings: int = typer.Option(1, "--max-trainings", min=0, max=16, help="Trainings the "
                                      "assistant may run at once (0: it cannot start any)."),
) -> None:
    """Serve bitlm's runs to an assistant over MCP (stdio: JSON-RPC on stdin and stdout, logs
    on stderr). Tools: list_runs, read_metrics, validate_spec, start_run, stop_run,
    evaluate_text, sample. Every run name stays inside RUNS_DIR."""
    from bitlm_core.errors import DataError

    from bitlm_mcp.server import build

    if not runs_dir.is_dir():
        raise DataError(f"{runs_dir} is not a folder; give the folder that holds your run "
                        "folders (`bitlm run` writes runs/<name> by default)")
    server, trainings = build(runs_dir, max_trainings)
    try:
        server.run(transport="stdio")
    finally:
        trainings.close()


def mcp_command():
    """The command's factory (``bitlm_commands``)."""
    return mcp
