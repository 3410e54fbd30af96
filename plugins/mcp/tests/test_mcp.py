"""`bitlm mcp` through the MCP SDK's own client over stdio: the tools, a bad spec's message, a
tiny run started and followed, sampling with the gate, and names kept inside the runs folder."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
import yaml

TEXT = ("the cat sat on the mat. the dog sat on the log. " * 60
        + "a bird sang in the tree and the sun was warm. " * 40)
TOOLS = {"list_runs", "read_metrics", "validate_spec", "start_run", "stop_run",
         "evaluate_text", "sample"}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    from bitlm_core.app.run import execute
    from bitlm_core.spec import validate_spec

    tmp = tmp_path_factory.mktemp("mcp")
    corpus = tmp / "tiny.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    runs = tmp / "runs"
    runs.mkdir()
    spec = {"name": "tiny", "data": {"corpus": {"name": "file", "options": {"path": str(corpus)}},
                                     "seq_len": 16, "val_fraction": 0.1},
            "model": {"layout": "framed", "d_model": 32, "n_layers": 2, "n_heads": 2},
            "train": {"steps": 12, "batch_size": 4, "warmup_steps": 2, "eval_every": 6,
                      "eval_batches": 2, "checkpoint_every": 6, "log_every": 2},
            "sample": {"prompt": "the ", "bytes": 16}, "output": {"report": False}}
    execute(validate_spec(spec), runs / "base", log=lambda m: None)
    return runs


def payload(result):
    """A tool result's value: structured content when there is one, else its text as JSON."""
    if result.structured_content is not None:
        value = result.structured_content
        return value.get("result", value) if isinstance(value, dict) and set(value) == {
            "result"} else value
    return json.loads(result.content[0].text)


def text_of(result) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def session_script(runs_dir: Path) -> dict:
    from mcp import Client, StdioServerParameters

    seen: dict = {}
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "bitlm_core", "mcp", str(runs_dir)])
    async with Client(params) as client:
        tools = await client.list_tools()
        seen["tools"] = {t.name: t for t in tools.tools}

        seen["runs"] = payload(await client.call_tool("list_runs", {}))
        bad = await client.call_tool("validate_spec", {"spec": "train: {stepz: 5}\n"})
        seen["bad_spec"] = (bad.is_error, text_of(bad))
        good = await client.call_tool("validate_spec", {"spec": "train: {steps: 5}\n"})
        seen["good_spec"] = (good.is_error, payload(good) if not good.is_error else None)
        outside = await client.call_tool("read_metrics", {"run": "../base"})
        seen["outside"] = (outside.is_error, text_of(outside))
        bad_arg = await client.call_tool("sample", {"run": "base", "bytes": "many"})
        seen["bad_arg"] = (bad_arg.is_error, text_of(bad_arg))

        started = await client.call_tool("start_run", {
            "base": "base", "name": "from-mcp", "overrides": {"train.steps": 8}})
        seen["started"] = (started.is_error, text_of(started))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = payload(await client.call_tool("list_runs", {}))
            row = next((r for r in rows if r["name"] == "from-mcp"), None)
            if row and row["status"] == "finished":
                break
            await asyncio.sleep(0.5)
        seen["finished_row"] = row
        seen["metrics"] = payload(await client.call_tool("read_metrics", {
            "run": "from-mcp", "series": ["train/bits_per_byte"], "max_points": 3}))
        seen["sample"] = payload(await client.call_tool("sample", {
            "run": "from-mcp", "prompt": "the ", "bytes": 24, "max_retries": 1}))
        seen["eval"] = payload(await client.call_tool("evaluate_text", {
            "run": "from-mcp", "text": "the cat sat on the mat. " * 4}))
    return seen


def test_an_assistant_drives_bitlm_over_stdio(runs_dir):
    pytest.importorskip("mcp")
    seen = asyncio.run(session_script(runs_dir))
    assert set(seen["tools"]) == TOOLS
    assert "spec" in seen["tools"]["validate_spec"].input_schema["properties"]
    assert [r["name"] for r in seen["runs"]] == ["base"]
    is_error, message = seen["bad_spec"]
    assert is_error and "stepz" in message and "does not validate" in message
    assert seen["good_spec"][0] is False and seen["good_spec"][1]["spec"]["train"]["steps"] == 5
    assert seen["outside"][0] and "not a run folder's name" in seen["outside"][1]
    assert seen["bad_arg"][0] and "bytes" in seen["bad_arg"][1]
    assert seen["started"][0] is False, seen["started"][1]
    row = seen["finished_row"]
    assert row is not None and row["status"] == "finished" and row["last_step"] == 8
    metrics = seen["metrics"]
    assert list(metrics["series"]) == ["train/bits_per_byte"]
    steps = metrics["series"]["train/bits_per_byte"]["step"]
    assert len(steps) == 3 and steps[0] == 2 and steps[-1] == 8  # 4 logged, thinned to 3
    assert "val/bits_per_byte" in metrics["available"]
    sample = seen["sample"]
    assert sample["text"].startswith("the ") and sample["allowed"] is True
    assert sample["attempts"][0]["number"] == 1 and sample["step"] == 8
    assert seen["eval"]["bits_per_byte"] > 0 and seen["eval"]["bytes"] == 96
    spec = yaml.safe_load((runs_dir / "from-mcp" / "spec.yaml").read_text())
    assert spec["train"]["steps"] == 8


def test_stdout_carries_the_protocol_only(runs_dir):
    """Every line the server writes on stdout is a JSON-RPC message, even when a tool fails and
    bitlm has something to say (that goes to stderr)."""
    import subprocess

    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "sample", "arguments": {"run": "no-such-run"}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
         "params": {"name": "list_runs", "arguments": {}}},
    ]
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "bitlm_core", "mcp", str(runs_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        proc.stdin.write("".join(json.dumps(m) + "\n" for m in messages))
        proc.stdin.flush()
        answers: dict = {}
        while 3 not in answers:
            line = proc.stdout.readline()
            assert line, f"the server ended early: {proc.stderr.read()[-2000:]}"
            message = json.loads(line)  # every line on stdout is a protocol message
            answers[message.get("id")] = message
        proc.stdin.close()
        rest = proc.stdout.read()
        assert all(json.loads(x) for x in rest.splitlines() if x.strip())
        proc.wait(60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert answers[2]["result"]["isError"] is True
    assert "no run named 'no-such-run'" in answers[2]["result"]["content"][0]["text"]
    assert answers[3]["result"]["isError"] is False
