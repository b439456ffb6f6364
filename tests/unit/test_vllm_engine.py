"""The vLLM backend's pure parts: the request it sends, how it reads vLLM's stream and errors,
and the command that starts vLLM. The backend itself runs in the `vllm` integration tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flywheel_server.domain import Sampling
from flywheel_server.engine_api import EngineRequest, TokenEvent
from flywheel_server.errors import AdapterNotFound, InvalidRequest, Overloaded, Unavailable
from flywheel_server.vllm_engine import (
    _error,
    completion_body,
    parse_sse,
    sse_lines,
    token_events,
)
from flywheel_server.vllm_sidecar import python_for_vllm, serve_command

pytestmark = pytest.mark.unit


def test_completion_body_carries_every_sampling_field() -> None:
    sampling = Sampling(temperature=0.7, top_p=0.9, top_k=5, max_tokens=12, stop=("\n",), seed=3)
    body = completion_body("policy-v2", EngineRequest((5, 6, 7), 4, sampling, "policy-v2"))
    assert body == {
        "model": "policy-v2",
        "prompt": [5, 6, 7],
        "n": 4,
        "max_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "stop": ["\n"],
        "seed": 3,
        "stream": True,
        "return_token_ids": True,
    }


def test_completion_body_leaves_out_what_is_off() -> None:
    body = completion_body("policy-v0", EngineRequest((1,), 1, Sampling(), None))
    assert not {"top_k", "stop", "seed"} & set(body)


def test_parse_sse_skips_blank_lines_and_done() -> None:
    assert parse_sse("") is None
    assert parse_sse(": keep-alive") is None
    assert parse_sse("data: [DONE]") is None
    assert parse_sse('data: {"choices": []}') == {"choices": []}


def test_sse_lines_split_only_at_newlines() -> None:
    # vLLM writes these characters raw inside JSON strings; str.splitlines would cut there.
    text = "a\x1cb\u2028c\x85d\re"
    event = ("data: " + json.dumps({"choices": [{"text": text}]}, ensure_ascii=False)).encode()
    stream = event + b"\n\ndata: [DONE]\n\n"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(stream), 7):  # cut anywhere, even inside a UTF-8 character
            yield stream[i : i + 7]

    async def lines() -> list[str]:
        return [line async for line in sse_lines(chunks())]

    got = asyncio.run(lines())
    assert got == [event.decode(), "", "data: [DONE]", ""]
    assert parse_sse(got[0]) == {"choices": [{"text": text}]}


def test_parse_sse_raises_on_an_error_chunk() -> None:
    line = "data: " + json.dumps({"error": {"message": "engine died", "code": 500}})
    with pytest.raises(Unavailable, match="engine died"):
        parse_sse(line)


def test_token_events_count_tokens_per_choice() -> None:
    tokens = [0, 0]
    chunk = {"choices": [{"index": 1, "text": "ab", "finish_reason": None, "token_ids": [7, 8]}]}
    assert token_events(chunk, tokens) == [TokenEvent(1, "ab", None, 2)]
    # A token that decodes to nothing yet (half a character) counts but sends no event.
    chunk = {"choices": [{"index": 0, "text": "", "finish_reason": None, "token_ids": [200]}]}
    assert token_events(chunk, tokens) == []
    chunk = {"choices": [{"index": 0, "text": "é", "finish_reason": "stop", "token_ids": [201]}]}
    assert token_events(chunk, tokens) == [TokenEvent(0, "é", "stop", 2)]
    assert tokens == [2, 2]


def test_token_events_refuse_an_aborted_completion() -> None:
    chunk = {"choices": [{"index": 0, "text": "", "finish_reason": "abort", "token_ids": []}]}
    with pytest.raises(Unavailable, match="abort"):
        token_events(chunk, [0])


@pytest.mark.parametrize(
    ("status", "kind"),
    [(404, AdapterNotFound), (400, InvalidRequest), (429, Overloaded), (500, Unavailable)],
)
def test_vllm_statuses_map_to_our_errors(status: int, kind: type) -> None:
    error = _error(status, json.dumps({"error": {"message": "why"}}))
    assert isinstance(error, kind)
    assert str(error) == f"vLLM answered {status}: why"


def test_serve_command_lets_extra_arguments_win(tmp_path: Path) -> None:
    command = serve_command(
        Path("/venv/bin/python"),
        tmp_path,
        port=8123,
        served_name="policy-v0",
        max_loras=4,
        max_model_len=256,
        cpu=True,
        extra="--gpu-memory-utilization 0.5 --max-lora-rank 8",
    )
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--port") + 1] == "8123"
    assert command[command.index("--served-model-name") + 1] == "policy-v0"
    assert "--enable-lora" in command
    # argparse keeps the last value of a repeated flag: the user's.
    utilisation = [command[i + 1] for i, a in enumerate(command) if a == "--gpu-memory-utilization"]
    assert utilisation == ["0.3", "0.5"]
    assert command[-2:] == ["--max-lora-rank", "8"]


def test_serve_command_on_gpu_keeps_vllm_memory_defaults(tmp_path: Path) -> None:
    command = serve_command(
        Path("python"), tmp_path, port=1, served_name="b", max_loras=2, max_model_len=8, cpu=False
    )
    assert "--gpu-memory-utilization" not in command and "--dtype" not in command


def test_a_missing_vllm_python_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="make vllm-env"):
        python_for_vllm(tmp_path / "nope" / "python")
