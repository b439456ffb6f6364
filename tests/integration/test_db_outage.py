"""The database goes away and comes back (issue 18): a TCP proxy the test can cut sits between
the server and a real PostgreSQL, on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from flywheel_client import FlywheelClient, Unavailable
from tests.support import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


class Proxy:
    """Forwards 127.0.0.1:port to `target`; `cut()` drops every connection and refuses new
    ones (as a failover or a network cut looks to the server), `restore()` listens again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            doomed, self._sockets = [*self._sockets, self._listener], []
        for s in doomed:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def until(check: Callable[[], bool], seconds: float) -> float:
    """Seconds until `check()` holds; fails after `seconds`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.2)
    return time.monotonic() - start


def test_the_server_answers_503_while_the_database_is_away_and_recovers(
    tiny_model, tmp_path, database
):
    url = make_url(database)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    server = ServerProcess(tiny_model, tmp_path / "data", args=["--db", proxied]).start()
    channel = grpc.insecure_channel(server.grpc)
    health = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool:
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        return status == health_pb2.HealthCheckResponse.SERVING

    def ready() -> bool:
        return httpx.get(f"{server.http}/readyz", timeout=10).status_code == 200

    try:
        with FlywheelClient(server.grpc, timeout=30) as client:
            first = client.generate("add: 1 + 2", n=2, max_tokens=2)
            acknowledged = client.rank(
                [c.id for c in first.completions], labeler="t", idempotency_key="before"
            )
            pending = client.generate("add: 2 + 2", n=2, max_tokens=2)

            proxy.cut()
            until(lambda: not ready(), 15)
            assert not serving()
            with pytest.raises(Unavailable, match="database is unavailable"):
                client.rank(
                    [c.id for c in pending.completions], labeler="t", idempotency_key="during"
                )
            body = {"prompt": "add: 3 + 3", "max_tokens": 2}
            during = httpx.post(f"{server.http}/v1/completions", json=body, timeout=60)
            assert during.status_code == 503
            assert "database is unavailable" in during.json()["error"]["message"]
            assert server.proc is not None and server.proc.poll() is None  # nothing crashed

            proxy.restore()
            recovered = until(ready, 30)
            assert serving()
            retried = client.rank(
                [c.id for c in pending.completions], labeler="t", idempotency_key="during"
            )
            assert client.generate("add: 4 + 4", max_tokens=2).completions
    finally:
        channel.close()
        server.stop()
        proxy.cut()
    # Nothing acknowledged was lost: both rankings are in the database, once each.
    engine = create_engine(database)
    with engine.connect() as conn:
        ids = sorted(r[0] for r in conn.execute(text("SELECT id FROM rankings")))
    engine.dispose()
    assert ids == sorted([acknowledged.ranking_id, retried.ranking_id])
    print(f"recovered {recovered:.1f} s after the database came back")
