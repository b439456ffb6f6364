"""Stalled streams: a client that stops reading is cut off after the write timeout, its
generation ends, and the server goes on serving the others without growing."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.harness import rss_bytes
from flywheel_proto.v1 import flywheel_pb2 as pb
from flywheel_proto.v1 import flywheel_pb2_grpc as pb_grpc
from tests.support import ServerProcess

pytestmark = pytest.mark.integration

STALLED = 2
TIMEOUT_S = 1.0
# A stream must outgrow the kernel's send buffer (autotuned to 4 MiB on loopback) before the
# server's own writes back up: 16 x 2,000 tokens are about 6 MB of SSE.
N, MAX_TOKENS = 16, 2000


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel_demo.model import build_random_model

    directory = tmp_path_factory.mktemp("models") / "long"
    return build_random_model(directory, hidden=32, layers=2, heads=2, max_positions=2048 + 64)


def stalled_stream(port: int) -> socket.socket:
    """A streamed request for N x MAX_TOKENS tokens from a client that never reads the answer (a
    tiny receive window, so the server's writes back up at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"prompt": "reverse: abc", "n": N, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                       "temperature": 1.0, "stream": True}).encode()  # fmt: skip
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    sock.sendall(head + body)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """What reaches the client: what the server wrote before the abort (the kernel still
    delivers the socket's send queue), then the end of the connection."""
    sock.settimeout(30)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 16):
            data += chunk
    return data


def wait_for_stalled(server: ServerProcess, transport: str, count: int) -> None:
    """Until /metrics counts `count` streams of `transport` cut off (at most 4 minutes: on a
    busy machine the engine takes a while to outgrow the socket buffers)."""
    seen = 0.0
    deadline = time.monotonic() + 240
    while seen < count and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = server.metric("flywheel_stalled_streams_total", transport=transport)
    assert seen == count


@pytest.fixture(scope="module")
def server(long_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--write-timeout-s", str(TIMEOUT_S), "--stream-interval-ms", "0",
            "--max-tokens-limit", str(MAX_TOKENS)]  # fmt: skip
    proc = ServerProcess(long_model, tmp_path_factory.mktemp("data"), args=args).start()
    yield proc
    proc.stop()


def test_stalled_http_streams_are_cut_off_and_the_rest_are_served(server):
    assert server.proc is not None
    for _ in range(3):  # warm up, so the RSS below is the server's working size
        assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 8})[0] == 200
    before = rss_bytes(server.proc.pid)
    sockets = [stalled_stream(server.http_port) for _ in range(STALLED)]
    # While they stall, another client is served in full.
    status, body = server.post("/v1/completions", {"prompt": "abc", "max_tokens": 8})
    assert status == 200 and body["choices"][0]["text"] is not None
    wait_for_stalled(server, "http", STALLED)
    for sock in sockets:
        with sock:
            data = read_to_end(sock)
        assert data.startswith(b"HTTP/1.1 200")
        assert b"data: [DONE]" not in data and not data.endswith(b"0\r\n\r\n")  # cut off
    # Their generations were cancelled, not recorded: the store holds the 4 served ones only.
    assert server.counts()["completions"] == 4
    grown = rss_bytes(server.proc.pid) - before
    assert grown < 64 << 20, f"the server grew {grown >> 20} MiB over {STALLED} stalled streams"
    assert server.post("/v1/completions", {"prompt": "abc", "max_tokens": 8})[0] == 200


def test_a_stalled_grpc_stream_ends_deadline_exceeded(server):
    # Without BDP probing the client's receive window stays at 64 KiB, so the server's
    # writes back up after a few hundred messages.
    with grpc.insecure_channel(server.grpc, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        sampling = pb.SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.0)
        request = pb.GenerateRequest(prompt=pb.Prompt(text="reverse: abc"), n=N,
                                     sampling=sampling)  # fmt: skip
        stream = pb_grpc.InferenceStub(channel).GenerateStream(request)
        assert next(stream).delta is not None
        wait_for_stalled(server, "grpc", 1)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"read nothing for {TIMEOUT_S:g} s" in info.value.details()


def test_an_idle_keep_alive_connection_outlives_the_clients_idle_timeout(server):
    """The server keeps an idle connection longer than clients keep theirs (httpx: 5 s), so
    the client closes first. Were it the other way round, a request sent just as the server
    closes would be reset: the soak's 2 failures in 61,000 (uvicorn's default was 5 s too)."""
    import http.client

    host, port = server.http.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        socks = []
        for pause in (6.0, 0.0):  # past httpx's keepalive_expiry and uvicorn's own default
            conn.request("GET", "/readyz")  # http.client keeps the connection between requests
            response = conn.getresponse()
            assert response.status == 200 and response.read()
            socks.append(conn.sock)
            time.sleep(pause)
        assert socks[0] is socks[1]  # the same connection served both
    finally:
        conn.close()
