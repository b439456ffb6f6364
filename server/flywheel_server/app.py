"""`flywheel serve`: one process, one engine, two transports (BentoML HTTP and grpc.aio)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import uvicorn

from flywheel_server.auth import Authenticator
from flywheel_server.backends import open_engine
from flywheel_server.config import ServerConfig
from flywheel_server.store import Store
from flywheel_server.write_timeout import with_write_timeout

if TYPE_CHECKING:  # the service imports prometheus-client, which must wait for prepare_process
    from flywheel_server.service import FlywheelService

log = logging.getLogger("flywheel")


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: this process stops both transports together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Runtime:
    service: FlywheelService
    auth: Authenticator
    ready: bool = False
    store_ok: bool = True  # the database answered the last ping (`watch_store`)
    addresses: dict[str, str] = field(default_factory=dict)


def model_dir(config: ServerConfig) -> Path:
    """The model directory to serve (the command line builds the demo's when none is given)."""
    if config.model is None:
        raise SystemExit("no model to serve: pass --model DIR (a Hugging Face causal-LM directory)")
    return config.model


def check_exposure(config: ServerConfig, auth: Authenticator) -> None:
    if auth.enabled:
        log.info("API keys loaded: %d", len(auth.keys))
        return
    if not config.is_loopback:
        raise SystemExit(
            f"refusing to bind {config.host} without API keys: give --api-keys-file FILE or set "
            "FLYWHEEL_API_KEYS, or bind 127.0.0.1"
        )
    log.warning("no API keys configured: auth is off, serving on loopback only (%s)", config.host)


async def serve(
    config: ServerConfig, *, stop: asyncio.Event | None = None, up: bool = False
) -> None:
    from flywheel_server import bento_service
    from flywheel_server.grpc_service import server_credentials, start_grpc
    from flywheel_server.service import FlywheelService

    if up and config.tls:
        raise SystemExit(
            "flywheel up starts its learner over plain loopback gRPC, so it does not take TLS "
            "flags: run `flywheel serve --tls-cert ... --tls-key ...` and, beside it, "
            "`flywheel learn --tls-ca ...` (with --tls-cert/--tls-key for mutual TLS)"
        )
    auth = Authenticator.load(config.api_keys_file, os.environ)
    check_exposure(config, auth)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    model = model_dir(config)
    engine_threads, learner_threads = config.thread_split(os.cpu_count() or 1, up)
    if engine_threads:
        torch.set_num_threads(engine_threads)
    store = await asyncio.to_thread(Store.open, config.database_url)
    engine = await open_engine(config, model)
    service = FlywheelService(engine, store, config)
    await service.adapters.start(seed_reward=config.reward)
    runtime = Runtime(service, auth)
    bento_service.install(runtime)

    tls = (
        server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        if config.tls_cert is not None and config.tls_key is not None
        else None
    )
    grpc_server, grpc_port, health = await start_grpc(
        service, auth, config.host, config.grpc_port, tls
    )
    http = _HttpServer(
        uvicorn.Config(
            bento_service.Flywheel.to_asgi(),  # type: ignore[attr-defined]  # added by @bentoml.service
            host=config.host,
            port=config.http_port,
            http=with_write_timeout(config.write_timeout_s),
            timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]  # a float works
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=30,
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
            ssl_ca_certs=str(config.tls_client_ca) if config.tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_client_ca else ssl.CERT_NONE,
        )
    )
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            await http_task
            raise SystemExit(f"HTTP server could not start on {config.host}:{config.http_port}")
        await asyncio.sleep(0.05)
    http_port = http.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if config.tls else "http"
    runtime.addresses = {
        "http": f"{scheme}://{config.host}:{http_port}",
        "grpc": f"{config.host}:{grpc_port}",
    }
    runtime.ready = True
    live = service.registry.live()
    print(
        f"flywheel: serving {engine.model_dir} ({engine.device}); live {', '.join(live.values())}\n"
        f"  HTTP (OpenAI-compatible): {runtime.addresses['http']}/v1\n"
        f"  gRPC:                     {runtime.addresses['grpc']}\n"
        f"  store:                    {config.database_url}",
        flush=True,
    )

    learner = start_learner(config, auth, grpc_port, model, learner_threads) if up else None
    follower = (
        asyncio.create_task(follow_store(service, config.sync_interval))
        if config.sync_interval
        else None
    )
    service.adapters.audit.refusals = auth.drain_refusals
    service.charge = auth.charge
    auditor = asyncio.create_task(service.adapters.audit.run())
    watcher = asyncio.create_task(watch_store(runtime, health))
    stop = stop or _stop_on_signals()
    await asyncio.wait(
        [asyncio.create_task(stop.wait()), http_task], return_when=asyncio.FIRST_COMPLETED
    )
    log.info("shutting down")
    if learner is not None:
        await asyncio.to_thread(stop_learner, learner)
    runtime.ready = False
    if follower is not None:
        follower.cancel()
    await health.enter_graceful_shutdown()
    http.should_exit = True
    await grpc_server.stop(grace=30)
    with contextlib.suppress(asyncio.CancelledError):
        await http_task
    auditor.cancel()
    watcher.cancel()
    with contextlib.suppress(Exception):
        await service.adapters.audit.flush()  # the last second's refusals
    await asyncio.to_thread(engine.close)
    store.close()


def start_learner(
    config: ServerConfig,
    auth: Authenticator,
    grpc_port: int,
    model: Path,
    threads: int,
) -> subprocess.Popen[bytes]:
    """`flywheel learn` against this server, as a child process logging to a file."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    work_dir = config.data_dir.resolve() / "learner"
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    admin = [k.key for k in auth.keys if "admin" in k.scopes]
    if admin:  # through the environment, not argv, so `ps` does not show it
        env["FLYWHEEL_API_KEY"] = admin[0]
    elif auth.enabled:
        log.warning("no admin-scope API key configured: the learner cannot export or publish")
    command = [sys.executable, "-m", "flywheel_cli", "learn", "--server",
               f"{host}:{grpc_port}", "--model", str(model), "--work-dir", str(work_dir),
               "--threads", str(threads), "--device", config.device,
               "--dtype", config.dtype]  # fmt: skip
    if config.reward is not None:  # the first refit starts there
        command += ["--reward-init", str(config.reward)]
    if config.pretraining is not None:
        command += ["--pretraining", str(config.pretraining)]
    if config.backend == "vllm":  # vLLM applies LoRA matrices only, not a policy's own norm
        command += ["--final-norm-lr", "0"]
    log_path = work_dir / "learner.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    print(f"  learner:                  pid {proc.pid}, log {log_path}", flush=True)
    return proc


def stop_learner(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then wait; its checkpoints are atomic, so stopping mid-round loses nothing."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def follow_store(service: FlywheelService, interval: int) -> None:
    """Keep this replica's versions and aliases in step with the shared store."""
    while True:
        await asyncio.sleep(interval)
        try:
            await service.adapters.sync()
        except Exception:  # a failed poll must not stop serving; the next one retries
            log.exception("sync with the store failed")


async def watch_store(runtime: Runtime, health: Any, interval: float = 1.0) -> None:
    """Ping the database every `interval` s: while it does not answer, /readyz is 503 and gRPC
    health NOT_SERVING (requests that need it get 503 / UNAVAILABLE meanwhile); once it answers
    again, both say so, and the pool's pre-ping replaces the dead connections."""
    from grpc_health.v1 import health_pb2

    from flywheel_server.grpc_service import SERVICE_NAMES

    while True:
        await asyncio.sleep(interval)
        try:
            ok = await asyncio.to_thread(runtime.service.store.ping)
        except Exception:  # whatever the ping raised, the database did not answer
            log.exception("database ping failed")
            ok = False
        if ok != runtime.store_ok:
            runtime.store_ok = ok
            log.warning("the database %s", "answers again" if ok else "does not answer")
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ["", *SERVICE_NAMES]:
                await health.set(name, status)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run(config: ServerConfig, *, up: bool = False) -> None:
    """Entry point of `flywheel serve`; `flywheel up` also runs the learner as a child process."""
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    prepare_process(config)
    asyncio.run(serve(config, up=up))


def prepare_process(config: ServerConfig) -> None:
    """Process-wide settings that must exist before bentoml or prometheus-client is imported."""
    # BentoML exposes prometheus-client in multiprocess mode, which reads this directory at
    # import time; files left by an earlier process would leak stale samples into /metrics.
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    metrics_dir = config.data_dir.resolve() / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
