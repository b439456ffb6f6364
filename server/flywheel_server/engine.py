"""The `torch` engine: transformers + peft behind one async interface.

One worker thread owns the model: requests run one at a time, the n completions of a request
as one batch, each streamed token by token. Adapters are peft LoRA adapters loaded under their
version id ("policy-v3"), so a request pinned to a version never sees another one's weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flywheel_learner import modeling

from flywheel_server.domain import Sampling
from flywheel_server.errors import AdapterNotFound, AdapterRefused, Overloaded
from flywheel_server.sampling import find_stop, safe_prefix_length, sample

log = logging.getLogger(__name__)

SMOKE_PROMPT = "Hello"
SMOKE_TOKENS = 4


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: tuple[int, ...]
    n: int
    sampling: Sampling
    adapter: str | None  # loaded adapter id, or None for the bare base model


@dataclass(frozen=True)
class TokenEvent:
    index: int
    delta: str
    finish_reason: str | None = None
    completion_tokens: int = 0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TorchEngine:
    def __init__(
        self, model_dir: str | Path, *, device: str = "auto", max_pending: int = 64
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.base_model = modeling.base_fingerprint(self.model_dir)
        self.model, self.tokenizer = modeling.load_base(self.model_dir, device=self.device)
        self.hidden_size: int = self.model.config.hidden_size
        self.max_positions: int = getattr(self.model.config, "max_position_embeddings", 2048)
        self.peft: Any = None  # peft.PeftModel once the first adapter is loaded
        self.heads: dict[str, modeling.ScoreHead] = {}
        self.max_pending = max_pending
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

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

    def _decode_text(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    @property
    def adapters(self) -> list[str]:
        return sorted(self.peft.peft_config) if self.peft is not None else []

    # -- async API --------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Stream token events; closing the iterator cancels the work at the next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: TokenEvent | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._decode(request, emit, cancelled)
                emit(None)
            except BaseException as e:  # handed to the awaiting side
                emit(e)

        self._admit()
        future = loop.run_in_executor(self._worker, self._released(work))
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await asyncio.shield(future)

    async def score(self, adapter: str, prompt: str, completions: list[str]) -> list[float]:
        self._admit()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._worker, self._released(lambda: self._score(adapter, prompt, completions))
        )

    async def load_adapter(self, adapter_id: str, path: str | Path, *, reward: bool) -> None:
        """Load, then smoke-check (finite logits, a few tokens); refuse and unload on failure."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker, lambda: self._load(adapter_id, Path(path), reward))

    async def unload_adapter(self, adapter_id: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._worker, lambda: self._unload(adapter_id))

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    # -- admission --------------------------------------------------------------------------

    def _admit(self) -> None:
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise Overloaded(
                    f"the server is at capacity ({self.max_pending} requests queued); retry later"
                )
            self._pending += 1

    def _released(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            try:
                return fn()
            finally:
                with self._pending_lock:
                    self._pending -= 1

        return run

    # -- worker-thread side -----------------------------------------------------------------

    @property
    def _net(self) -> Any:
        return self.peft if self.peft is not None else self.model

    @contextlib.contextmanager
    def _using(self, adapter: str | None) -> Iterator[None]:
        if adapter is not None and adapter not in self.adapters:
            raise AdapterNotFound(f"adapter {adapter} is not loaded")
        if self.peft is None:
            yield
        elif adapter is None:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(adapter)
            yield

    @torch.inference_mode()
    def _decode(
        self,
        req: EngineRequest,
        emit: Callable[[TokenEvent | BaseException | None], None],
        cancelled: threading.Event,
    ) -> None:
        s = req.sampling
        n = req.n
        eos = self.tokenizer.eos_token_id
        temperature = torch.full((n,), s.temperature, device=self.device)
        top_k = torch.full((n,), s.top_k, device=self.device, dtype=torch.long)
        top_p = torch.full((n,), s.top_p, device=self.device)
        generators: list[torch.Generator | None] = [self._generator(s.seed, i) for i in range(n)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        sent = [0] * n  # characters already streamed per row
        done = [False] * n
        with self._using(req.adapter):
            ids = torch.tensor([list(req.prompt_ids)] * n, device=self.device)
            out = self._net(input_ids=ids, use_cache=True)
            for step in range(s.max_tokens):
                next_ids = sample(out.logits[:, -1], temperature, top_k, top_p, generators)
                for i in range(n):
                    if done[i]:
                        continue
                    token = int(next_ids[i])
                    last = step == s.max_tokens - 1
                    if token == eos:
                        done[i] = True
                        emit(self._flush(i, tokens[i], sent, s.stop, "stop"))
                        continue
                    tokens[i].append(token)
                    text = self._decode_text(tokens[i])
                    cut = find_stop(text, s.stop)
                    if cut >= 0 or last:
                        done[i] = True
                        text = text[:cut] if cut >= 0 else text
                        emit(
                            TokenEvent(
                                i, text[sent[i] :], "stop" if cut >= 0 else "length", len(tokens[i])
                            )
                        )
                        continue
                    # Hold back a trailing replacement char: a multi-byte character mid-way.
                    upto = safe_prefix_length(text.removesuffix("\ufffd"), s.stop)
                    if upto > sent[i]:
                        emit(TokenEvent(i, text[sent[i] : upto], None, len(tokens[i])))
                        sent[i] = upto
                if all(done) or cancelled.is_set():
                    return
                out = self._net(
                    input_ids=next_ids.unsqueeze(-1),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )

    def _flush(
        self, i: int, tokens: list[int], sent: list[int], stops: tuple[str, ...], reason: str
    ) -> TokenEvent:
        text = self._decode_text(tokens)
        cut = find_stop(text, stops)
        text = text[:cut] if cut >= 0 else text
        return TokenEvent(i, text[sent[i] :], reason, len(tokens))

    def _generator(self, seed: int | None, row: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed((seed + row * 1_000_003) % (1 << 63))
        return g

    @torch.inference_mode()
    def _score(self, adapter: str, prompt: str, completions: list[str]) -> list[float]:
        head = self.heads[adapter]
        rows = [
            modeling.reward_token_ids(self.tokenizer, prompt, c, self.max_positions)
            for c in completions
        ]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device
        )
        with self._using(adapter):
            return modeling.score(self._net, head, ids, mask).float().cpu().tolist()

    def _load(self, adapter_id: str, path: Path, reward: bool) -> None:
        try:
            modeling.read_adapter_config(path)
            trained_on = modeling.read_adapter_meta(path).get("base_model")
        except ValueError as e:
            raise AdapterRefused(str(e)) from e
        if trained_on and trained_on != self.base_model:
            raise AdapterRefused(
                f"adapter {adapter_id} was trained on base model {trained_on}; "
                f"this server serves {self.base_model}"
            )
        try:
            head = (
                modeling.ScoreHead.load(path, self.hidden_size).to(self.device) if reward else None
            )
            self._attach(adapter_id, path)
        except Exception as e:
            raise AdapterRefused(f"adapter {adapter_id} could not be loaded: {e}") from e
        try:
            if head is not None:
                self.heads[adapter_id] = head
            self._smoke_check(adapter_id, head)
        except Exception as e:
            self._unload(adapter_id)
            if isinstance(e, AdapterRefused):
                raise
            raise AdapterRefused(f"adapter {adapter_id} failed its smoke check: {e}") from e

    def _attach(self, adapter_id: str, path: Path) -> None:
        from peft import PeftModel

        if adapter_id in self.adapters:
            return  # idempotent: versions are immutable, never reloaded in place
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.model, str(path), adapter_name=adapter_id
                )
                self.peft.eval()
            else:
                self.peft.load_adapter(str(path), adapter_name=adapter_id)
        except Exception:
            # peft injects LoRA layers before it reads the weights: take them out again.
            if self.peft is None:
                strip_lora_layers(self.model)
            else:
                self._unload(adapter_id)
            raise

    @torch.inference_mode()
    def _smoke_check(self, adapter_id: str, head: modeling.ScoreHead | None) -> None:
        ids = torch.tensor(
            [self.encode(SMOKE_PROMPT) or [self.tokenizer.eos_token_id]], device=self.device
        )
        with self._using(adapter_id):
            if head is not None:
                values = modeling.score(self._net, head, ids, torch.ones_like(ids))
                if not torch.isfinite(values).all():
                    raise AdapterRefused(f"adapter {adapter_id} gives non-finite rewards")
                return
            for _ in range(SMOKE_TOKENS):
                logits = self._net(input_ids=ids).logits[:, -1]
                if not torch.isfinite(logits).all():
                    raise AdapterRefused(f"adapter {adapter_id} gives non-finite logits")
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)

    def _unload(self, adapter_id: str) -> None:
        self.heads.pop(adapter_id, None)
        if adapter_id not in self.adapters:
            return
        remaining = [a for a in self.adapters if a != adapter_id]
        if remaining:
            self.peft.set_adapter(remaining[0])
            self.peft.delete_adapter(adapter_id)
        else:
            # peft cannot hold zero adapters: drop the wrapper and restore the bare base layers.
            self.model = self.peft.unload()
            self.peft = None


def strip_lora_layers(model: torch.nn.Module) -> None:
    """Put every module peft wrapped back to its base layer (after a failed first load)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
