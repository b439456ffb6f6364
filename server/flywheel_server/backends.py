"""Which engine generates (`--backend`): the torch engine, or vLLM in front of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flywheel_server.config import ServerConfig
from flywheel_server.engine_api import Engine
from flywheel_server.torch_engine import TorchEngine


async def open_engine(config: ServerConfig, model_dir: Path) -> Engine:
    """The torch engine; for `--backend vllm`, a vLLM server in front of it for generation
    (started here unless --vllm-url names one)."""
    torch_engine = await asyncio.to_thread(
        TorchEngine,
        model_dir,
        device=config.device,
        dtype=config.dtype,
        max_pending=config.max_pending,
        max_batch=config.max_batch,
        stream_interval_s=config.stream_interval_ms / 1000,
    )
    if config.backend == "torch":
        return torch_engine
    from flywheel_server import vllm_sidecar
    from flywheel_server.vllm_engine import VllmEngine

    process = None
    url = config.vllm_url
    try:
        if url is None:
            port = vllm_sidecar.free_loopback_port()
            command = vllm_sidecar.serve_command(
                vllm_sidecar.python_for_vllm(config.vllm_python),
                model_dir,
                port=port,
                served_name="policy-v0",
                # the live version, a candidate, and the retired ones kept for rollback
                max_loras=config.keep_versions + 2,
                max_model_len=torch_engine.max_positions,
                cpu=torch_engine.device == "cpu",
                extra=config.vllm_args,
            )
            process = vllm_sidecar.VllmProcess(command, port, config.data_dir / "vllm.log")
            process.start()  # here, on the main thread (see VllmProcess.start)
            await process.wait_ready()
            url = process.url
        else:
            await vllm_sidecar.wait_until_healthy(url)
        return await asyncio.to_thread(
            VllmEngine, torch_engine, url, max_pending=config.max_pending, process=process
        )
    except BaseException:
        torch_engine.close()
        if process is not None:
            process.stop()
        raise
