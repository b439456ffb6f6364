"""A full server, or a key over its token budget, is refused before any work: no chat template
rendered, nothing tokenised."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_server.config import ServerConfig
from flywheel_server.errors import Overloaded, RateLimited
from flywheel_server.generation import PromptInput
from flywheel_server.service import FlywheelService
from flywheel_server.store import Store
from flywheel_server.validation import RawSampling

pytestmark = pytest.mark.unit


class BusyEngine:
    """An engine with `admitted` requests in flight that must not be asked to do anything."""

    base_model = "fake-base"
    max_positions = 64
    vocab_size = 100
    device = "cpu"

    def __init__(self, admitted: int) -> None:
        self.admitted = admitted
        self.calls: list[str] = []

    @property
    def load(self) -> dict[str, int]:
        return {"admitted": self.admitted, "waiting": 0, "rows": 0}

    def encode(self, text: str) -> list[int]:
        self.calls.append("encode")
        return [1, 2, 3]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        self.calls.append("render_chat")
        return "chat"


def service(engine: BusyEngine, tmp_path: Path) -> FlywheelService:
    config = ServerConfig(data_dir=tmp_path, max_pending=4)
    return FlywheelService(engine, Store.open("sqlite://"), config)  # type: ignore[arg-type]


spent: list[tuple[str, int]] = []


def over_budget(caller: str, tokens: int) -> None:
    spent.append((caller, tokens))
    raise RateLimited("spent", key=caller, retry_after=1.0)


def test_at_capacity_a_request_is_refused_before_rendering_or_tokenising(tmp_path: Path) -> None:
    engine = BusyEngine(admitted=4)
    busy = service(engine, tmp_path)
    chat = PromptInput(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(Overloaded, match="at capacity"):
        busy.generate_stream(chat, n=1, sampling=RawSampling())
    with pytest.raises(Overloaded, match="at capacity"):
        busy.generate_stream(PromptInput(text="hi"), n=1, sampling=RawSampling())
    assert engine.calls == []
    engine.admitted = 3  # one place left, but no tokens left in the caller's budget
    busy.charge = over_budget
    with pytest.raises(RateLimited, match="spent"):
        busy.generate_stream(chat, n=2, sampling=RawSampling(max_tokens=8))
    assert engine.calls == [] and spent[-1][1] == 16  # n x max_tokens, before any work
    busy.charge = lambda caller, tokens: None
    # the request goes on to be rendered and tokenised
    busy.generate_stream(chat, n=1, sampling=RawSampling(max_tokens=8))
    assert engine.calls == ["render_chat", "encode"]


def test_each_candidate_group_keeps_every_sampling_field() -> None:
    """Groups after the first get their own seed, and nothing else changes (ignore_eos too)."""
    from types import SimpleNamespace

    from flywheel_server.domain import Sampling
    from flywheel_server.generation import GenerationStream

    asked = Sampling(temperature=0.7, max_tokens=9, seed=5, min_tokens=4, ignore_eos=True)
    group = GenerationStream._group_sampling(SimpleNamespace(sampling=asked), 3)  # type: ignore[arg-type]
    assert group == Sampling(temperature=0.7, max_tokens=9, seed=8, min_tokens=4, ignore_eos=True)


async def test_a_lost_audit_record_does_not_fail_the_change(tmp_path: Path) -> None:
    from flywheel_server.audit import AuditTrail

    class Broken:
        def add_audit(self, entries: object) -> None:
            raise RuntimeError("database gone")

    await AuditTrail(Broken()).record("rollback", "policy-v2")  # type: ignore[arg-type]  # logged, not raised
