"""What a generation engine is to the rest of the server: its requests, its events, and the
interface the service and the adapter lifecycle call. Both engines (`torch_engine.TorchEngine`,
`vllm_engine.VllmEngine`) import this; neither imports the other's internals for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flywheel_model import adapters
from flywheel_model.adapters import AdapterSpec
from flywheel_server.domain import Sampling
from flywheel_server.errors import AdapterRefused, Overloaded

SMOKE_PROMPT = "Hello"  # what a freshly loaded adapter must answer with finite numbers
SMOKE_TOKENS = 4


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: tuple[int, ...]
    n: int
    sampling: Sampling
    adapter: str | None  # loaded adapter id, or None for the bare base model


@dataclass(frozen=True)
class TokenLogprob:
    """A token's text and log-probability, and the most likely alternatives there (a prompt's
    first token has none)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()
    token_id: int = -1


@dataclass(frozen=True)
class TokenEvent:
    index: int
    delta: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens behind delta (Sampling.logprobs)


class Engine(Protocol):
    model_dir: Path
    device: str
    base_model: str
    max_positions: int
    vocab_size: int  # token ids a logit_bias may name

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def render_chat(self, messages: list[dict[str, str]]) -> str: ...
    def generate_batches(self, request: EngineRequest) -> AsyncIterator[list[TokenEvent]]: ...
    async def prompt_logprobs(
        self, prompt: tuple[int, ...], adapter: str | None, top: int
    ) -> list[TokenLogprob]: ...
    async def score(self, adapter: str, prompt: str, completions: list[str]) -> list[float]: ...
    async def load_adapter(self, adapter_id: str, path: str | Path, *, reward: bool) -> None: ...
    async def unload_adapter(self, adapter_id: str) -> None: ...
    @property
    def adapters(self) -> list[str]: ...
    @property
    def load(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def check_admission(closed: bool, admitted: int, max_pending: int) -> None:
    """Refuse a request at once (429 / RESOURCE_EXHAUSTED) rather than queue without bound."""
    if closed:
        raise Overloaded("the engine is shutting down")
    if admitted >= max_pending:
        raise Overloaded(
            f"the server is at capacity ({max_pending} requests admitted); retry later"
        )


def read_spec(adapter_id: str, path: Path, base_model: str) -> AdapterSpec:
    """The adapter's spec (`flywheel_model.adapters.read_spec`); AdapterRefused saying why not."""
    try:
        return adapters.read_spec(path, base_model=base_model, name=adapter_id)
    except ValueError as e:
        raise AdapterRefused(str(e)) from e
