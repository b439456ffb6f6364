"""A generation request as it runs: its rows, its stream of events, and the one store write that
records its completions (grouped with other requests' writes).

A stream holds its rows' adapter versions in the registry from admission to its end, so a
version retired meanwhile is unloaded only after the stream has finished with it.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace

from flywheel_server import metrics
from flywheel_server.domain import CompletionRecord, PromptRecord, Sampling
from flywheel_server.engine_api import Engine, EngineRequest, TokenEvent, TokenLogprob
from flywheel_server.registry import AdapterRegistry
from flywheel_server.store import Store
from flywheel_server.validation import printable


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class PromptInput:
    """Raw text, chat messages rendered with the model's chat template, or token ids."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Generation:
    prompt_id: str
    prompt_tokens: int
    completions: list[CompletionRecord]
    logprobs: list[tuple[TokenLogprob, ...]]  # per completion, where Sampling.logprobs asked
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # where the prompt was scored (echo)


@dataclass(frozen=True)
class StreamEvent:
    prompt_id: str
    completion_id: str
    index: int
    delta: str
    finish_reason: str | None
    policy: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Row:
    """One completion being produced."""

    id: str
    index: int
    policy: str
    adapter: str | None
    text: str = ""
    finish_reason: str = "length"
    tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


class GroupCommit:
    """Finished generations from many requests, written in one transaction: one fsync for all.

    Each caller still waits until its own rows are committed, so an id a client sees finish can
    always be ranked; under load the commits of concurrent requests share the disk flush.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[tuple[PromptRecord, list[CompletionRecord], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, prompt: PromptRecord, completions: list[CompletionRecord]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((prompt, completions, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(
                    self.store.record_generations, [(p, c) for p, c, _ in batch]
                )
            except Exception as e:
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(e)
            else:
                for *_, done in batch:
                    if not done.done():
                        done.set_result(None)


class GenerationStream:
    """An async iterator of StreamEvents; records every completion once all have finished.

    Finishing events are held back until the completions are in the store, so an id a client
    has seen finish can always be ranked.
    """

    def __init__(
        self,
        engine: Engine,
        registry: AdapterRegistry,
        recorder: GroupCommit,
        prompt: PromptRecord,
        prompt_ids: tuple[int, ...],
        sampling: Sampling,
        rows: list[Row],
        *,
        score_prompt: bool = False,
    ) -> None:
        """score_prompt: first score the prompt's tokens (OpenAI's `echo` with logprobs), with
        sampling.logprobs alternatives, into prompt_logprobs."""
        self.engine = engine
        self.registry = registry
        self.recorder = recorder
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.rows = rows
        self.score_prompt = score_prompt
        self.prompt_logprobs: tuple[TokenLogprob, ...] = ()
        self._batches: AsyncGenerator[list[StreamEvent], None] = self._run()
        self._buffer: collections.deque[StreamEvent] = collections.deque()
        self.result: Generation
        registry.acquire(row.adapter for row in rows)
        self._held = True

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> StreamEvent:
        while not self._buffer:
            self._buffer.extend(await self._batches.__anext__())
        return self._buffer.popleft()

    async def batches(self) -> AsyncIterator[list[StreamEvent]]:
        """The events as they become ready, several at a time under load."""
        if self._buffer:
            yield list(self._buffer)
            self._buffer.clear()
        async for batch in self._batches:
            yield batch

    async def finish(self) -> Generation:
        """Run to the end without looking at the events."""
        async for _ in self.batches():
            pass
        return self.result

    async def aclose(self) -> None:
        await self._batches.aclose()
        self._release()  # when it never started, _run's own release did not run

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.registry.release(row.adapter for row in self.rows)

    async def _run(self) -> AsyncGenerator[list[StreamEvent], None]:
        try:
            async for batch in self._events():
                yield batch
        finally:
            self._release()

    async def _score_prompt(self) -> tuple[TokenLogprob, ...]:
        """An entry for every prompt token, under the rows' policy: the first token has no
        log-probability (nothing comes before it)."""
        ids, adapter = self.prompt_ids, self.rows[0].adapter
        rest = await self.engine.prompt_logprobs(ids, adapter, self.sampling.logprobs or 0)
        return (TokenLogprob(self.engine.decode(ids[:1]), None, token_id=ids[0]), *rest)

    async def _events(self) -> AsyncGenerator[list[StreamEvent], None]:
        if self.score_prompt:
            self.prompt_logprobs = await self._score_prompt()
        groups: dict[str | None, list[Row]] = {}
        for row in self.rows:
            groups.setdefault(row.adapter, []).append(row)
        held: list[StreamEvent] = []
        for adapter, rows in groups.items():
            request = EngineRequest(
                self.prompt_ids, len(rows), self._group_sampling(rows[0].index), adapter
            )
            async for events in self.engine.generate_batches(request):
                metrics.first_token()
                ready: list[StreamEvent] = []
                for event in events:
                    out = self._apply(rows[event.index], event)
                    (ready if out.finish_reason is None else held).append(out)
                if ready:
                    yield ready
        completions = [
            CompletionRecord(
                r.id,
                self.prompt.id,
                r.index,
                r.text,
                r.finish_reason,  # type: ignore[arg-type]
                r.policy,
                self.sampling,
                len(self.prompt_ids),
                r.tokens,
            )
            for r in self.rows
        ]
        await self.recorder.record(self.prompt, completions)
        metrics.generated(completions)
        self.result = Generation(
            self.prompt.id, len(self.prompt_ids), completions, [r.logprobs for r in self.rows],
            self.prompt_logprobs,
        )  # fmt: skip
        if held:
            yield held

    def _group_sampling(self, first_index: int) -> Sampling:
        s = self.sampling
        if s.seed is None or first_index == 0:
            return s
        return replace(s, seed=s.seed + first_index)

    def _apply(self, row: Row, event: TokenEvent) -> StreamEvent:
        event = replace(event, delta=printable(event.delta))
        row.text += event.delta
        row.logprobs += event.logprobs
        row.tokens = event.completion_tokens
        if event.finish_reason is not None:
            row.finish_reason = event.finish_reason
        return StreamEvent(
            self.prompt.id, row.id, row.index, event.delta, event.finish_reason, row.policy,
            event.logprobs,
        )  # fmt: skip
