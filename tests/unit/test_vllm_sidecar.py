"""VllmProcess with a stand-in for vLLM (a few lines of http.server): it waits for /health,
reports a child that died while starting, and stops the child's whole process group."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from flywheel_server.vllm_sidecar import VllmProcess, free_loopback_port

pytestmark = pytest.mark.unit

FAKE_VLLM = """
import http.server, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # an engine worker
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def running_in_group(group: int) -> list[int]:
    """Pids of the group's processes that still run (zombies, dead but not yet reaped, do not)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def test_waits_for_health_then_stops_the_whole_group(tmp_path: Path) -> None:
    port = free_loopback_port()
    command = [sys.executable, "-c", FAKE_VLLM, str(port)]
    process = VllmProcess(command, port, tmp_path / "vllm.log").start()
    try:
        asyncio.run(process.wait_ready(timeout_s=30))
        assert process.proc is not None and process.proc.poll() is None
        group = process.proc.pid  # its own session: the group id is its pid
    finally:
        process.stop(timeout_s=10)
    assert process.proc.poll() is not None
    assert running_in_group(group) == []  # the worker it started is gone too


def test_a_child_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('no module named vllm'); sys.exit(3)"]
    process = VllmProcess(command, free_loopback_port(), tmp_path / "vllm.log").start()
    with pytest.raises(SystemExit, match=r"(?s)exited with 3.*no module named vllm"):
        asyncio.run(process.wait_ready(timeout_s=30))
