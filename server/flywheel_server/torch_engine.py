"""The `torch` engine: transformers + peft behind one async interface, with continuous batching.

One scheduler thread owns the model. Every step it runs queued commands (adapter loads, reward
scoring), lets waiting requests join the running batch (prefill into the decoder's cache), decodes
one token for every row, and drops rows that finished or whose client went away: no request waits
for the slowest. Each row names its own adapter, so one batch serves several policy versions; a
request started on a version finishes on it.

Decoding runs on `LlamaDecoder` (a lean forward with a slot cache) for Llama-shaped models and on
`GenericDecoder` (transformers' forward, peft's per-row `adapter_names`) for any other model.
Reward scoring and adapter smoke checks always run through transformers and peft.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from flywheel_model import loading, precision
from flywheel_server.decoding import Decoder, GenericDecoder, Row
from flywheel_server.engine_api import (
    EngineRequest,
    TokenEvent,
    TokenLogprob,
    check_admission,
)
from flywheel_server.errors import Overloaded
from flywheel_server.llama_decoder import LlamaDecoder, unsupported_reason
from flywheel_server.sampling import adjust_logits, forbid_token, sample, token_logprobs
from flywheel_server.torch_adapters import LoadedAdapters

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
T = TypeVar("T")


Delivery = list[TokenEvent | None] | BaseException


@dataclass(eq=False)
class _Request:
    spec: EngineRequest
    loop: asyncio.AbstractEventLoop  # where the caller awaits
    queue: asyncio.Queue[Delivery]
    cancelled: threading.Event = field(default_factory=threading.Event)
    alive: int = 0  # rows still decoding
    held: list[TokenEvent | None] = field(default_factory=list)  # decoded, not yet delivered
    delivered_at: float = -math.inf  # time.monotonic() of the last delivery

    def emit(self, item: Delivery) -> None:
        _post(self.loop, [(self.queue, item)])


def _post(
    loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue[Delivery], Delivery]]
) -> None:
    """Hand events to an event loop: one wake-up for many requests."""

    def deliver() -> None:
        for queue, item in items:
            queue.put_nowait(item)

    with contextlib.suppress(RuntimeError):  # the caller's loop is gone; nobody is listening
        loop.call_soon_threadsafe(deliver)


def merge_events(events: list[TokenEvent]) -> list[TokenEvent]:
    """One event per completion: its deltas and logprobs joined, its latest count and finish."""
    merged: dict[int, TokenEvent] = {}
    for e in events:
        if (seen := merged.get(e.index)) is not None:
            e = replace(e, delta=seen.delta + e.delta, logprobs=seen.logprobs + e.logprobs)
        merged[e.index] = e
    return list(merged.values())


class TorchEngine:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_pending: int = 64,
        max_batch: int = 64,
        stream_interval_s: float = 0.0,
        decoder: str = "auto",
    ) -> None:
        """stream_interval_s: least time between two deliveries to one request (0: each step).
        decoder: "auto" (the lean decoder where the model allows it) or "generic".
        device, dtype: `flywheel_model.precision` (auto: CUDA in bfloat16 when present, else
        CPU in float32)."""
        self.model_dir = Path(model_dir)
        where = precision.resolve(device, dtype)
        self.device, self.dtype = where.device, where.dtype
        self.base_model = loading.base_fingerprint(self.model_dir)
        model, self.tokenizer = loading.load_base(self.model_dir, device=self.device,
                                                  dtype=self.dtype)  # fmt: skip
        self.hidden_size: int = model.config.hidden_size
        self.max_positions: int = getattr(model.config, "max_position_embeddings", 2048)
        self.vocab_size: int = model.get_output_embeddings().weight.shape[0]
        self.loaded = LoadedAdapters(
            model, self.tokenizer, device=self.device, base_model=self.base_model,
            max_length=self.max_positions, in_use=self._adapters_in_use,
        )  # fmt: skip
        self.max_pending = max_pending  # requests admitted (running or waiting) at once
        self.max_batch = max_batch  # rows decoded together
        self.stream_interval_s = stream_interval_s
        self._decoder = self._make_decoder(decoder)
        self._token_texts: dict[int, str] = {}  # token id -> its text, for logprobs
        self.loaded.decoder = self._decoder
        self._rows: list[Row] = []  # running rows, in the decoder's order
        self._next_ids: torch.Tensor | None = None  # (rows,): each row's next input token
        self._waiting: collections.deque[_Request] = collections.deque()
        self._commands: collections.deque[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]]
        ] = collections.deque()
        self._admitted = 0
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def _make_decoder(self, choice: str) -> Decoder:
        if choice not in ("auto", "generic"):
            raise ValueError(f"decoder must be auto or generic, got {choice!r}")
        reason = unsupported_reason(self.model) if choice == "auto" else "generic was asked for"
        if reason is None:
            log.info("decoding with the lean Llama decoder")
            return LlamaDecoder(self.model)
        log.info("decoding with transformers' forward: %s", reason)
        return GenericDecoder(self.loaded.forward, self.tokenizer.pad_token_id or 0, self.device)

    @property
    def decoder(self) -> str:
        return "lean" if isinstance(self._decoder, LlamaDecoder) else "generic"

    # -- text ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            # A base model without a template: plain "role: content" lines.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join([*lines, "assistant:"])
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(rendered)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))

    def _decode_text(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    @property
    def adapters(self) -> list[str]:
        return self.loaded.names

    @property
    def model(self) -> Any:
        """The base model (peft wraps it in place while adapters are loaded)."""
        return self.loaded.model

    @property
    def peft(self) -> Any:
        return self.loaded.peft

    @property
    def final_norms(self) -> dict[str, torch.Tensor]:
        return self.loaded.final_norms

    def _adapters_in_use(self) -> set[str | None]:
        return {r.adapter for r in self._rows} | {q.spec.adapter for q in self._waiting}

    @property
    def load(self) -> dict[str, int]:
        """Admitted requests and running rows (for metrics and tests)."""
        return {"admitted": self._admitted, "waiting": len(self._waiting), "rows": len(self._rows)}

    # -- async API --------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Stream token events one by one (see generate_batches)."""
        async for batch in self.generate_batches(request):
            for event in batch:
                yield event

    async def generate_batches(self, request: EngineRequest) -> AsyncIterator[list[TokenEvent]]:
        """Stream token events, one per completion with every token decoded since the last
        delivery. A request gets at most one delivery per stream_interval_s (its first tokens
        and its end go at once), and a consumer that falls behind catches up in one write.
        Closing the iterator drops the request's rows at the next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        req = _Request(request, loop, queue)
        with self._wake:
            check_admission(self._closed, self._admitted, self.max_pending)
            self._admitted += 1
            self._waiting.append(req)
            self._wake.notify()
        try:
            done = False
            while not done:
                ready: list[TokenEvent] = []
                delivery = await queue.get()
                while True:
                    if isinstance(delivery, BaseException):
                        raise delivery
                    for item in delivery:
                        if item is None:
                            done = True
                        else:
                            ready.append(item)
                    if done or queue.empty():
                        break
                    delivery = queue.get_nowait()
                if ready:
                    yield merge_events(ready)
        finally:
            req.cancelled.set()
            with self._wake:
                self._wake.notify()

    async def prompt_logprobs(
        self, prompt: tuple[int, ...], adapter: str | None, top: int
    ) -> list[TokenLogprob]:
        """The entry of each prompt token after the first (its log-probability given those
        before it, under adapter, and its `top` alternatives), between two decode steps."""
        return await self._call(lambda: self._prompt_logprobs(prompt, adapter, top))

    async def score(self, adapter: str, prompt: str, completions: list[str]) -> list[float]:
        return await self._call(lambda: self.loaded.score(adapter, prompt, completions))

    async def load_adapter(self, adapter_id: str, path: str | Path, *, reward: bool) -> None:
        """Load, then smoke-check (finite logits, a few tokens); refuse and unload on failure."""
        await self._call(lambda: self.loaded.load(adapter_id, Path(path), reward))

    async def unload_adapter(self, adapter_id: str) -> None:
        await self._call(lambda: self.loaded.unload(adapter_id))

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run fn on the scheduler thread between two decode steps."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._wake:
            if self._closed:
                raise Overloaded("the engine is shutting down")
            self._commands.append((fn, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    # -- the scheduler thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._commands or self._waiting or self._rows or self._closed):
                    self._wake.wait()
                if self._closed:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)
            try:
                self._admit_waiting()
                if self._rows:
                    self._step()
            except Exception as e:  # a model failure ends the requests it touched, not the engine
                log.exception("decode step failed")
                for req in {r.owner for r in self._rows}:
                    self._finish(req, e)
                self._rows, self._next_ids = [], None
                self._decoder.clear()
        for req in [*self._waiting, *{r.owner for r in self._rows}]:
            req.emit(Overloaded("the engine shut down before the request finished"))
        for _, future in self._commands:
            future.set_exception(Overloaded("the engine shut down"))

    def _admit_waiting(self) -> None:
        """Move waiting requests into the batch while rows are free, prefilling them together."""
        admitted: list[_Request] = []
        room = self.max_batch - len(self._rows)
        with self._wake:
            while self._waiting:
                req = self._waiting[0]
                if req.cancelled.is_set():
                    self._waiting.popleft()
                    self._release()
                    continue
                if req.spec.n > room and (self._rows or admitted):
                    break
                admitted.append(self._waiting.popleft())
                room -= req.spec.n
        if not admitted:
            return
        try:
            self._prefill(admitted)
        except Exception as e:
            for req in admitted:
                self._finish(req, e)

    @torch.inference_mode()
    def _prefill(self, reqs: list[_Request]) -> None:
        """One forward over the new prompts; each request's n rows share it."""
        specs = [r.spec for r in reqs]
        adapters = [spec.adapter for spec in specs]
        self.loaded.check_loaded(adapters)
        rows = [
            Row(
                req,
                i,
                req.spec.adapter,
                req.spec.sampling,
                self._generator(req.spec.sampling.seed, i),
            )
            for req in reqs
            for i in range(req.spec.n)
        ]
        before = len(self._rows)
        try:
            logits = self._decoder.prefill(
                [spec.prompt_ids for spec in specs], [spec.n for spec in specs], adapters
            )
            first = self._sample(rows, logits)
        except Exception:
            self._decoder.keep(list(range(before)))  # the running rows go on as they were
            raise
        for req in reqs:
            req.alive = req.spec.n
        alive = self._emit(rows, first, self._logprobs(rows, logits, first))
        ids = first if self._next_ids is None else torch.cat([self._next_ids, first])
        self._keep([*self._rows, *rows], ids, [*range(before), *(before + i for i in alive)])

    @torch.inference_mode()
    def _step(self) -> None:
        assert self._next_ids is not None
        rows = self._rows
        logits = self._decoder.step(self._next_ids, [r.adapter for r in rows])
        ids = self._sample(rows, logits)
        self._keep(rows, ids, self._emit(rows, ids, self._logprobs(rows, logits, ids)))

    def _keep(self, rows: list[Row], ids: torch.Tensor, keep: list[int]) -> None:
        """Go on with the rows at these indices (and their next input tokens)."""
        order = self._decoder.keep(keep)
        self._rows = [rows[i] for i in order]
        self._next_ids = (
            ids[torch.tensor(order, dtype=torch.long, device=ids.device)] if order else None
        )

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        def column(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        ending = [not r.sampling.may_end(len(r.tokens)) for r in rows]
        logits = forbid_token(logits, self.tokenizer.eos_token_id, ending)
        logits = adjust_logits(logits, [(r.tokens, r.sampling) for r in rows])
        return sample(
            logits,
            column([r.sampling.temperature for r in rows], torch.float32),
            column([r.sampling.top_k for r in rows], torch.long),
            column([r.sampling.top_p for r in rows], torch.float32),
            [r.generator for r in rows],
        )

    def _logprobs(
        self, rows: list[Row], logits: torch.Tensor, ids: torch.Tensor
    ) -> list[TokenLogprob | None]:
        """Each row's chosen token with its log-probability (and alternatives), where its
        request asked for them."""
        return self._entries(logits, ids, [r.sampling.logprobs for r in rows])

    @torch.inference_mode()
    def _prompt_logprobs(
        self, prompt: tuple[int, ...], adapter: str | None, top: int
    ) -> list[TokenLogprob]:
        self.loaded.check_loaded([adapter])
        logits = self._decoder.prompt_logits(prompt, adapter)[:-1]
        ids = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device)
        return [e for e in self._entries(logits, ids, [top] * len(ids)) if e is not None]

    def _entries(
        self, logits: torch.Tensor, ids: torch.Tensor, wanted: list[int | None]
    ) -> list[TokenLogprob | None]:
        """Token ids[i]'s entry after logits[i] with wanted[i] alternatives (None: no entry)."""
        if all(w is None for w in wanted):
            return [None] * len(wanted)
        chosen, top, top_ids = token_logprobs(logits, ids, max(w or 0 for w in wanted))
        ids_l, chosen_l, top_l, top_ids_l = (t.tolist() for t in (ids, chosen, top, top_ids))
        return [
            None if w is None else TokenLogprob(
                self._token_text(ids_l[i]), chosen_l[i],
                tuple(zip(map(self._token_text, top_ids_l[i][:w]), top_l[i][:w], strict=True)),
                ids_l[i],
            )
            for i, w in enumerate(wanted)
        ]  # fmt: skip

    def _token_text(self, token: int) -> str:
        if token not in self._token_texts:
            self._token_texts[token] = str(self.tokenizer.decode([token]))
        return self._token_texts[token]

    def _emit(
        self, rows: list[Row], tokens: torch.Tensor, logprobs: list[TokenLogprob | None]
    ) -> list[int]:
        """Advance every row by its token, send each request its events; indices still running."""
        eos = self.tokenizer.eos_token_id
        events: dict[_Request, list[TokenEvent | None]] = {}
        alive = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            req = row.owner
            if req.cancelled.is_set():
                req.alive = 0
                events.setdefault(req, [])
                continue
            if (entry := logprobs[i]) is not None:  # the end's too: every sampled token's
                row.logprobs.append(entry)
            delta, finish = row.advance(token, eos, self._decode_text)
            if delta or finish:
                events.setdefault(req, []).append(
                    TokenEvent(row.index, delta, finish, len(row.tokens), tuple(row.logprobs))
                )
                row.logprobs.clear()
            if finish is None:
                alive.append(i)
            else:
                req.alive -= 1
        deliveries: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delivery], Delivery]]
        ] = {}
        now = time.monotonic()
        for req, items in events.items():
            req.held += items
            if req.alive <= 0:
                req.held.append(None)
                self._release()
            elif now - req.delivered_at < self.stream_interval_s:
                continue  # delivered recently: these go with a later step's
            if req.held:
                deliveries.setdefault(req.loop, []).append((req.queue, req.held))
                req.held, req.delivered_at = [], now
        for loop, batch in deliveries.items():
            _post(loop, batch)
        return alive

    def _finish(self, req: _Request, error: BaseException) -> None:
        req.emit(error)
        self._release()

    def _release(self) -> None:
        with self._wake:
            self._admitted -= 1

    def _generator(self, seed: int | None, row: int) -> torch.Generator | None:
        """A seeded request gets a generator per row (reproducible); others share torch's."""
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed((seed + row * 1_000_003) % (1 << 63))
        return g
