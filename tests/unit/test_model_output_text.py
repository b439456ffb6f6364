"""A NUL a model decodes to (a random model's byte token can) is streamed and stored as
U+FFFD: PostgreSQL text cannot hold it, and the text a client sees is the text it can rank."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from flywheel_server.config import ServerConfig
from flywheel_server.engine_api import EngineRequest, TokenEvent
from flywheel_server.generation import PromptInput
from flywheel_server.service import FlywheelService
from flywheel_server.store import Store
from flywheel_server.validation import RawSampling

pytestmark = pytest.mark.unit


class NulEngine:
    base_model = "fake-base"
    max_positions = 64
    vocab_size = 100
    device = "cpu"
    load: ClassVar = {"admitted": 0, "waiting": 0, "rows": 0}
    adapters: ClassVar[list[str]] = []

    def encode(self, text: str) -> list[int]:
        return [1, 2, 3]

    async def generate_batches(self, request: EngineRequest) -> AsyncIterator[list[TokenEvent]]:
        yield [TokenEvent(i, "a\x00", None, 2) for i in range(request.n)]
        yield [TokenEvent(i, "b", "length", 3) for i in range(request.n)]


async def test_a_nul_in_model_output_is_streamed_and_stored_as_the_replacement_character(
    tmp_path: Path,
) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'db'}")
    service = FlywheelService(NulEngine(), store, ServerConfig(data_dir=tmp_path))  # type: ignore[arg-type]
    stream = service.generate_stream(
        PromptInput(text="hi"), n=2, sampling=RawSampling(max_tokens=8)
    )
    deltas = [e.delta async for e in stream]
    assert deltas == ["a\ufffd", "a\ufffd", "b", "b"]
    ids = [c.id for c in stream.result.completions]
    assert [c.text for c in store.get_completions(ids).values()] == ["a\ufffdb"] * 2
