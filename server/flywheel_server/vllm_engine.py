"""The `vllm` engine: generation by a vLLM OpenAI server behind flywheel, over loopback HTTP.

vLLM batches and schedules; this class keeps flywheel's contract in front of it. Each adapter
version is loaded into vLLM under its own id (`policy-v7`) and never reloaded in place, so vLLM's
prefix cache cannot serve a stale version; a retired version is unloaded only once no request
runs on it. vLLM has no LoRA + scalar head, so reward scoring, tokenising and chat templates
stay on an embedded `TorchEngine` over the same base model.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from flywheel_model import adapters
from flywheel_server.engine_api import (
    SMOKE_PROMPT,
    SMOKE_TOKENS,
    EngineRequest,
    TokenEvent,
    TokenLogprob,
    check_admission,
    read_spec,
)
from flywheel_server.errors import (
    AdapterNotFound,
    AdapterRefused,
    Conflict,
    InvalidRequest,
    Overloaded,
    Unavailable,
)
from flywheel_server.torch_engine import TorchEngine
from flywheel_server.vllm_sidecar import VllmProcess

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length")
READ_TIMEOUT_S = 600.0  # between two chunks of one stream


class VllmEngine:
    def __init__(
        self,
        scorer: TorchEngine,
        url: str,
        *,
        max_pending: int = 64,
        process: VllmProcess | None = None,
    ) -> None:
        self.scorer = scorer
        self.url = url.rstrip("/")
        self.process = process  # the vLLM we started, stopped with us; None for a sidecar
        self.model_dir = scorer.model_dir
        self.base_model = scorer.base_model
        self.hidden_size = scorer.hidden_size
        self.vocab_size = scorer.vocab_size
        self.max_pending = max_pending
        self.base_name, served_len = served_base_model(self.url)
        self.max_positions = min(scorer.max_positions, served_len)
        self.device = f"vllm at {self.url}"
        self._policies: set[str] = set()
        self._running: collections.Counter[str] = collections.Counter()
        self._admitted = 0
        self._closed = False
        self._client: httpx.AsyncClient | None = None

    # -- what the torch engine does for us ---------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.scorer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.scorer.decode(ids)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.scorer.render_chat(messages)

    async def prompt_logprobs(
        self, prompt: tuple[int, ...], adapter: str | None, top: int
    ) -> list[TokenLogprob]:
        """vLLM's own echo: its entries for the prompt's tokens after the first."""
        if adapter is not None and adapter not in self._policies:
            raise AdapterNotFound(f"adapter {adapter} is not loaded")
        body = {"model": adapter or self.base_name, "prompt": list(prompt), "max_tokens": 1,
                "temperature": 0, "echo": True, "logprobs": top}  # fmt: skip
        response = await self._post("/v1/completions", body)
        if response.status_code != 200:
            raise _error(response.status_code, response.text)
        try:
            logprobs = response.json()["choices"][0]["logprobs"]
            return list(token_logprobs(logprobs, prompt, top)[1 : len(prompt)])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise Unavailable(f"the vLLM backend sent unreadable logprobs: {e!r}") from e

    async def score(self, adapter: str, prompt: str, completions: list[str]) -> list[float]:
        return await self.scorer.score(adapter, prompt, completions)

    @property
    def adapters(self) -> list[str]:
        return sorted(self._policies | set(self.scorer.adapters))

    @property
    def load(self) -> dict[str, int]:
        return {"admitted": self._admitted, "waiting": 0, "rows": sum(self._running.values())}

    # -- generation --------------------------------------------------------------------------

    async def generate_batches(self, request: EngineRequest) -> AsyncIterator[list[TokenEvent]]:
        """Stream vLLM's chunks as token events. Closing the iterator closes the HTTP stream,
        and vLLM aborts the request."""
        model = request.adapter or self.base_name
        if request.adapter is not None and request.adapter not in self._policies:
            raise AdapterNotFound(f"adapter {request.adapter} is not loaded")
        check_admission(self._closed, self._admitted, self.max_pending)
        self._admitted += 1
        self._running[model] += request.n
        try:
            tokens = [0] * request.n
            async with self._http().stream(
                "POST", "/v1/completions", json=completion_body(model, request)
            ) as response:
                if response.status_code != 200:
                    raise _error(response.status_code, (await response.aread()).decode())
                async for line in sse_lines(response.aiter_bytes()):
                    chunk = parse_sse(line)
                    if chunk is None:
                        continue
                    events = token_events(chunk, tokens, request.sampling.logprobs)
                    if events:
                        yield events
        except httpx.HTTPError as e:
            raise Unavailable(f"the vLLM backend at {self.url} failed: {e!r}") from e
        except (ValueError, KeyError, IndexError, TypeError) as e:  # a chunk we cannot read
            raise Unavailable(f"the vLLM backend sent an unreadable chunk: {e!r}") from e
        finally:
            self._admitted -= 1
            self._running[model] -= request.n

    # -- adapters ----------------------------------------------------------------------------

    async def load_adapter(self, adapter_id: str, path: str | Path, *, reward: bool) -> None:
        """Check the files, load into vLLM under adapter_id, smoke-check; refuse and unload on
        failure. Reward adapters go to the torch engine."""
        if reward:
            await self.scorer.load_adapter(adapter_id, path, reward=True)
            return
        if adapter_id in self._policies:
            return  # versions are immutable: never reloaded in place
        path = Path(path)
        if read_spec(adapter_id, path, self.base_model).final_norm:
            raise AdapterRefused(
                f"adapter {adapter_id} also trains its own final norm, which vLLM does not "
                "apply to a LoRA adapter; train the policy without it to serve it with vLLM "
                "(flywheel learn --final-norm-lr 0)"
            )
        check_finite_weights(adapter_id, path)  # vLLM's own checks cover rank and targets
        response = await self._post(
            "/v1/load_lora_adapter", {"lora_name": adapter_id, "lora_path": str(path.resolve())}
        )
        if response.status_code != 200:
            raise AdapterRefused(f"vLLM refused adapter {adapter_id}: {_message(response.text)}")
        self._policies.add(adapter_id)
        try:
            await self._smoke_check(adapter_id)
        except Exception as e:
            await self._unload_policy(adapter_id)
            if isinstance(e, AdapterRefused):
                raise
            raise AdapterRefused(f"adapter {adapter_id} failed its smoke check: {e}") from e

    async def unload_adapter(self, adapter_id: str) -> None:
        if adapter_id in self.scorer.adapters:
            await self.scorer.unload_adapter(adapter_id)
        if adapter_id not in self._policies:
            return
        if self._running[adapter_id]:
            raise Conflict(f"adapter {adapter_id} is serving requests; unload it once they finish")
        await self._unload_policy(adapter_id)

    async def _unload_policy(self, adapter_id: str) -> None:
        response = await self._post("/v1/unload_lora_adapter", {"lora_name": adapter_id})
        if response.status_code not in (200, 404):
            raise Unavailable(f"vLLM could not unload {adapter_id}: {_message(response.text)}")
        self._policies.discard(adapter_id)

    async def _smoke_check(self, adapter_id: str) -> None:
        body = {
            "model": adapter_id,
            "prompt": self.encode(SMOKE_PROMPT) or [0],
            "max_tokens": SMOKE_TOKENS,
            "temperature": 0,
            "logprobs": 1,
        }
        response = await self._post("/v1/completions", body)
        if response.status_code != 200:
            raise AdapterRefused(
                f"adapter {adapter_id} failed its smoke check: {_message(response.text)}"
            )
        logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"]
        if not logprobs or not all(isinstance(x, float) and math.isfinite(x) for x in logprobs):
            raise AdapterRefused(f"adapter {adapter_id} gives non-finite logits")

    # -- plumbing ----------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made on first use, inside the event loop that serves
            self._client = httpx.AsyncClient(
                base_url=self.url,
                timeout=httpx.Timeout(10.0, read=READ_TIMEOUT_S),
                limits=httpx.Limits(max_connections=self.max_pending + 8),
            )
        return self._client

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._http().post(path, json=body)
        except httpx.HTTPError as e:
            raise Unavailable(f"the vLLM backend at {self.url} failed: {e!r}") from e

    def close(self) -> None:
        self._closed = True
        self.scorer.close()
        if self.process is not None:
            self.process.stop()


def served_base_model(url: str) -> tuple[str, int]:
    """(name, max_model_len) of the base model a vLLM server serves."""
    try:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise SystemExit(f"no vLLM OpenAI server answers at {url}/v1/models: {e!r}") from e
    base = [m for m in models if not m.get("parent")]
    if not base:
        raise SystemExit(f"the vLLM server at {url} lists no base model: {models}")
    return str(base[0]["id"]), int(base[0].get("max_model_len") or 1 << 30)


def completion_body(model: str, request: EngineRequest) -> dict[str, Any]:
    """A streaming /v1/completions request; vLLM seeds choice i with seed + i."""
    s = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt_ids),
        "n": request.n,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stream": True,
        "return_token_ids": True,
    }
    if s.top_k:
        body["top_k"] = s.top_k
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.min_tokens:
        body["min_tokens"] = s.min_tokens
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    if s.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in s.logit_bias}
    if s.logprobs is not None:
        body["logprobs"] = s.logprobs
    return body


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """An event stream's lines, split at "\n" only. (httpx's aiter_lines also splits at the
    characters str.splitlines knows, such as \x1c or \u2028, which vLLM leaves raw inside JSON
    strings: a completion holding one would arrive cut in two.)"""
    pending = b""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.decode()


def parse_sse(line: str) -> dict[str, Any] | None:
    """The JSON of one `data:` line; None for blank lines, comments and the final [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return None
    chunk: dict[str, Any] = json.loads(data)
    if "error" in chunk:
        raise Unavailable(f"vLLM failed mid-stream: {_message(data)}")
    return chunk


def token_events(
    chunk: dict[str, Any], tokens: list[int], top: int | None = None
) -> list[TokenEvent]:
    """One event per choice in a chunk; `tokens` counts each choice's tokens so far; `top`:
    the alternatives asked for with each token's log-probability (None: none asked)."""
    events = []
    for choice in chunk.get("choices", []):
        index = int(choice["index"])
        ids = choice.get("token_ids") or ()
        tokens[index] += len(ids)
        finish = choice.get("finish_reason")
        if finish is not None and finish not in FINISH_REASONS:
            raise Unavailable(f"vLLM ended completion {index} with {finish!r}")
        entries = () if top is None else token_logprobs(choice.get("logprobs"), ids, top)
        if choice.get("text") or finish is not None or entries:
            text = choice.get("text") or ""
            events.append(TokenEvent(index, text, finish, tokens[index], entries))
    return events


def token_logprobs(
    logprobs: dict[str, Any] | None, ids: Sequence[int], top: int
) -> tuple[TokenLogprob, ...]:
    """vLLM's completions-shaped logprobs as entries, each with its `top` best alternatives
    (vLLM adds the chosen token's own when it is not among them); ids: the tokens' ids."""
    if not logprobs:
        return ()
    columns = logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
    return tuple(
        TokenLogprob(
            token, logprob,
            tuple(sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[:top]),
            ids[i] if i < len(ids) else -1,
        )
        for i, (token, logprob, alternatives) in enumerate(zip(*columns, strict=True))
    )  # fmt: skip


def check_finite_weights(adapter_id: str, path: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(path / adapters.ADAPTER_WEIGHTS))
    if not all(torch.isfinite(w).all() for w in weights.values()):
        raise AdapterRefused(f"adapter {adapter_id} has non-finite weights")


def _error(status: int, text: str) -> Exception:
    message = f"vLLM answered {status}: {_message(text)}"
    if status == 404:
        return AdapterNotFound(message)
    if status == 400:
        return InvalidRequest(message)
    if status in (429, 503):
        return Overloaded(message)
    return Unavailable(message)


def _message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:500]
