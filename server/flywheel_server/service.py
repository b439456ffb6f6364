"""The service: every business rule of serving and feedback, behind both transports.

Transports convert wire <-> these calls; the service validates, asks the engine, and records in
the store. A request that fails validation stores nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from flywheel_proto import archive
from flywheel_server import challenge as challenge_math
from flywheel_server import metrics, validation
from flywheel_server.backends import Engine
from flywheel_server.config import ServerConfig
from flywheel_server.domain import (
    ADAPTER_NAMES,
    AdapterVersion,
    Challenge,
    ChallengeStatus,
    CompletionRecord,
    Demonstration,
    DemonstrationExport,
    DemonstrationReceipt,
    PromptExport,
    PromptRecord,
    Ranking,
    RankingExport,
    RankingReceipt,
    Sampling,
)
from flywheel_server.engine import EngineRequest, TokenEvent
from flywheel_server.errors import (
    AdapterRefused,
    Conflict,
    FlywheelError,
    InvalidRequest,
    NotFound,
)
from flywheel_server.registry import AdapterRegistry
from flywheel_server.store import Store

log = logging.getLogger(__name__)

DEFAULT_K = 4
DRAIN_POLL_S = 0.2
DRAIN_ATTEMPTS = 1500  # five minutes: longer than any request within the token limits
EXPORT_PAGE = 500
MAX_ADAPTER_BYTES = 2 << 30


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class PromptInput:
    """Raw text, or chat messages rendered with the model's chat template."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class Generation:
    prompt_id: str
    prompt_tokens: int
    completions: list[CompletionRecord]


@dataclass(frozen=True)
class StreamEvent:
    prompt_id: str
    completion_id: str
    index: int
    delta: str
    finish_reason: str | None
    policy: str


@dataclass(frozen=True)
class PublishHeader:
    name: str
    base_model: str
    sha256: str
    size: int
    metrics: dict[str, float] = field(default_factory=dict)
    promote: bool = False
    challenger: bool = False  # a policy that challenges the live one (not with promote)


@dataclass
class _Row:
    """One completion being produced."""

    id: str
    index: int
    policy: str
    adapter: str | None
    text: str = ""
    finish_reason: str = "length"
    tokens: int = 0


class FlywheelService:
    def __init__(self, engine: Engine, store: Store, config: ServerConfig) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        self.registry = AdapterRegistry(engine.base_model)
        self.adapters_dir = config.data_dir / "adapters"
        # A request may not ask for more tokens than the model has positions for.
        self.max_tokens_limit = min(config.max_tokens_limit, engine.max_positions - 1)
        self._admin = asyncio.Lock()
        self.recorder = GroupCommit(store)
        self._draining: dict[str, asyncio.Task[None]] = {}
        self.thresholds = challenge_math.Thresholds(
            config.challenger_confidence,
            config.challenger_promote_above,
            config.challenger_retire_below,
            config.challenger_min_rankings,
        )
        # The running challenge as the store last said (every change here, and sync(), reload it).
        self._challenge: Challenge | None = None
        self.last_challenge: ChallengeStatus | None = None  # the latest tally, for the gauges
        self._rng = random.Random()

    # -- start-up ---------------------------------------------------------------------------

    async def start(self, *, seed_reward: Path | None = None) -> None:
        """Load every stored version that is not refused; seed the demo's reward model once."""
        versions = await asyncio.to_thread(self.store.list_adapter_versions)
        if seed_reward is not None and not any(v.name == "reward" for v in versions):
            data = archive.pack_directory(seed_reward)
            await self.publish(
                PublishHeader(
                    "reward", self.engine.base_model, archive.sha256(data), len(data), promote=True
                ),
                _once(data),
            )
            versions = await asyncio.to_thread(self.store.list_adapter_versions)
        for v in versions:
            if v.state == "refused":
                continue
            try:
                await self.engine.load_adapter(v.id, v.path, reward=v.name == "reward")
            except AdapterRefused as e:
                log.error("stored adapter %s refused at start-up: %s", v.id, e.message)
                await asyncio.to_thread(self.store.set_adapter_state, v.name, v.version, "refused")
                continue
            (self.registry.set_live if v.state == "live" else self.registry.add)(v)
        await self._reload_challenge()

    async def sync(self) -> None:
        """Follow the shared store: load versions other replicas published, move the aliases.

        Replicas share one database and an adapter directory they can all read; each calls this
        every few seconds (app.serve), so a version promoted on one goes live on all.
        """
        async with self._admin:
            versions = await asyncio.to_thread(self.store.list_adapter_versions)
            loaded = {v.id for v in self.registry.versions()}
            for v in versions:
                if v.id in loaded or v.state not in ("live", "ready") or not v.path:
                    continue  # a path is set once the publishing replica renamed the files in place
                try:
                    await self.engine.load_adapter(v.id, v.path, reward=v.name == "reward")
                except AdapterRefused as e:
                    log.error("adapter %s from the shared store refused here: %s", v.id, e.message)
                    continue
                self.registry.add(v)
                log.info("loaded %s published by another replica", v.id)
            for name in ADAPTER_NAMES:
                self.registry.refresh(name, [v for v in versions if v.name == name])
                await self._unload_retired(name)
            await self._reload_challenge()

    # -- generation -------------------------------------------------------------------------

    def render(self, prompt: PromptInput) -> tuple[Literal["text", "chat"], str]:
        """(kind, prompt text the policy sees)."""
        if (prompt.text is None) == (prompt.messages is None):
            raise InvalidRequest("give exactly one of prompt or messages", field="prompt")
        if prompt.text is not None:
            return "text", validation.text("prompt", prompt.text)
        return "chat", self.engine.render_chat(validation.messages(prompt.messages))

    def _encode_prompt(self, text: str, sampling: Sampling) -> tuple[int, ...]:
        ids = self.engine.encode(text)
        limit = min(self.config.max_prompt_tokens, self.engine.max_positions - sampling.max_tokens)
        if len(ids) > limit:
            raise InvalidRequest(
                f"prompt is {len(ids)} tokens; with max_tokens={sampling.max_tokens} at most {limit} fit",
                field="prompt",
            )
        return tuple(ids)

    def sampling(self, raw: validation.RawSampling) -> Sampling:
        return validation.sampling(raw, max_tokens_limit=self.max_tokens_limit)

    async def generate(
        self, prompt: PromptInput, *, n: int, sampling: Sampling, policy: str = ""
    ) -> Generation:
        return await self.generate_stream(prompt, n=n, sampling=sampling, policy=policy).finish()

    def generate_stream(
        self, prompt: PromptInput, *, n: int, sampling: Sampling, policy: str = ""
    ) -> GenerationStream:
        """Validate now (errors raise before any event), then stream as the caller iterates."""
        n = validation.integer("n", n, 1, self.config.max_n)
        kind, text = self.render(prompt)
        policy_id, adapter = self.registry.resolve(policy, kind="policy", field="policy")
        rows = [_Row(new_id("cmpl"), i, policy_id, adapter) for i in range(n)]
        return GenerationStream(
            self,
            PromptRecord(new_id("prm"), text, kind),
            self._encode_prompt(text, sampling),
            sampling,
            rows,
        )

    async def compare(
        self, prompt: PromptInput, *, k: int, sampling: Sampling, policies: Sequence[str] = ()
    ) -> Generation:
        """K candidates: candidate i from policies[i % len(policies)]; without policies, from the
        live policy, or (challenger_share of requests while a challenge runs) a blind mix of the
        challenger's and the champion's."""
        k = validation.integer("k", k or DEFAULT_K, 2, self.config.max_n)
        kind, text = self.render(prompt)
        challenge = None if policies else self._draw_challenge()
        if challenge is None:
            chosen = [
                self.registry.resolve(p, kind="policy", field="policies")
                for p in (policies or [""])
            ]
            rows = [_Row(new_id("cmpl"), i, *chosen[i % len(chosen)]) for i in range(k)]
        else:
            sides = {
                True: (challenge.challenger_id, challenge.challenger_id),
                False: self.registry.resolve(challenge.champion_id, kind="policy", field="policy"),
            }
            seats = challenge_math.challenger_seats(k, self._rng)
            rows = [_Row(new_id("cmpl"), i, *sides[seat]) for i, seat in enumerate(seats)]
        stream = GenerationStream(
            self,
            PromptRecord(
                new_id("prm"), text, kind, challenge=None if challenge is None else challenge.seq
            ),
            self._encode_prompt(text, sampling),
            sampling,
            rows,
        )
        result = await stream.finish()
        if challenge is None:
            return result
        # Blind: the store keeps which candidate came from which version; the labeler sees none.
        return replace(result, completions=[replace(c, policy="") for c in result.completions])

    def _draw_challenge(self) -> Challenge | None:
        """The running challenge, for challenger_share of the comparisons that may carry it."""
        challenge = self._challenge
        if challenge is None or self._rng.random() >= self.config.challenger_share:
            return None
        loaded = {v.id for v in self.registry.versions("policy")}
        if (
            self.registry.live()["policy"] != challenge.champion_id
            or challenge.challenger_id not in loaded
        ):
            return None  # this replica has not caught up with the shared store yet
        return challenge

    async def score(
        self, prompt: str, completions: Sequence[str], reward_model: str = ""
    ) -> tuple[list[float], str]:
        prompt = validation.text("prompt", prompt)
        if not completions:
            raise InvalidRequest("completions must hold at least one string", field="completions")
        validation.integer("completions", len(completions), 1, self.config.max_n * 4)
        for i, c in enumerate(completions):
            validation.text(f"completions[{i}]", c, allow_empty=True)
        reward_id, adapter = self.registry.resolve(
            reward_model, kind="reward", field="reward_model"
        )
        assert adapter is not None
        return await self.engine.score(adapter, prompt, list(completions)), reward_id

    # -- feedback ---------------------------------------------------------------------------

    async def rank(
        self, tiers: Sequence[Sequence[str]], *, labeler: str, idempotency_key: str = ""
    ) -> RankingReceipt:
        labeler = validation.label("labeler", labeler)
        key = (
            validation.label("idempotency_key", idempotency_key)
            if idempotency_key
            else new_id("key")
        )
        clean = validation.ranking(tiers)
        ranking = Ranking(clean, labeler, key)
        found = await asyncio.to_thread(self.store.get_completions, ranking.ids)
        unknown = [cid for cid in ranking.ids if cid not in found]
        if unknown:
            raise NotFound(
                f"unknown completion id(s): {', '.join(unknown)}; only ids this service issued can be ranked",
                field="ranking",
            )
        prompts = {c.prompt_id for c in found.values()}
        if len(prompts) > 1:
            raise InvalidRequest(
                f"ranking mixes completions of {len(prompts)} different prompts; rank completions of one prompt",
                field="ranking",
            )
        receipt = await asyncio.to_thread(self.store.add_ranking, ranking, prompts.pop())
        metrics.ranked(receipt)
        if not receipt.duplicate:
            try:
                await self._judge_challenge(found.values())
            except FlywheelError as e:  # the ranking is stored; the next one judges again
                log.error("challenge not judged after %s: %s", receipt.ranking_id, e.message)
        return receipt

    async def demonstrate(
        self, prompt: PromptInput, response: str, *, labeler: str, idempotency_key: str = ""
    ) -> DemonstrationReceipt:
        _, text = self.render(prompt)
        demo = Demonstration(
            text,
            validation.text("response", response),
            validation.label("labeler", labeler),
            validation.label("idempotency_key", idempotency_key)
            if idempotency_key
            else new_id("key"),
        )
        receipt = await asyncio.to_thread(self.store.add_demonstration, demo)
        metrics.demonstrated(receipt)
        return receipt

    # -- learner-facing ---------------------------------------------------------------------

    def versions(self, name: str = "") -> tuple[list[AdapterVersion], dict[str, str]]:
        return self.registry.versions(name), self.registry.live()

    # -- champion / challenger --------------------------------------------------------------

    async def challenge_status(self, name: str = "") -> ChallengeStatus | None:
        """The running challenge with its tally, else the last one that ended; None if none ran
        (or for name "reward": only policies are challenged)."""
        if name == "reward":
            return None
        latest = await asyncio.to_thread(self.store.latest_challenge)
        return None if latest is None else await self._status(latest)

    async def challenge(self, version: int | None = None, *, stop: bool = False) -> ChallengeStatus:
        """Challenge the live policy with a loaded ready version, or stop the running challenge."""
        if stop and version is not None:
            raise InvalidRequest(
                "give a version to challenge with, or stop; not both", field="stop"
            )
        if not stop and version is None:
            raise InvalidRequest(
                "give the policy version to challenge the live one with, or stop", field="version"
            )
        async with self._admin:
            if version is not None:
                challenge = await self._start_challenge(version)
            else:
                running = await asyncio.to_thread(self.store.running_challenge)
                ended = (
                    None
                    if running is None
                    else await asyncio.to_thread(self.store.end_challenge, running.seq, "stopped")
                )
                await self._reload_challenge()
                if ended is None:
                    raise Conflict("no challenge is running", field="stop")
                challenge = ended
                log.info("challenge of %s stopped", challenge.challenger_id)
        return await self._status(challenge)

    async def _start_challenge(self, version: int) -> Challenge:
        version = validation.integer("version", version, 1, 1 << 31)
        if f"policy-v{version}" not in {v.id for v in self.registry.versions("policy")}:
            raise NotFound(f"policy-v{version} is not a loaded version", field="version")
        challenge = await asyncio.to_thread(self.store.start_challenge, version)
        self._challenge = challenge
        log.info("%s challenges %s", challenge.challenger_id, challenge.champion_id)
        return challenge

    async def _reload_challenge(self) -> None:
        self._challenge = await asyncio.to_thread(self.store.running_challenge)

    async def _status(self, challenge: Challenge) -> ChallengeStatus:
        """The tally of a challenge, derived from the rankings in the store (so it survives a
        restart and every replica sharing the database sees the same)."""
        rankings = await asyncio.to_thread(self.store.challenge_rankings, challenge)
        scores = challenge_math.scores(rankings, challenge.challenger_id, challenge.champion_id)
        status = ChallengeStatus(
            challenge,
            challenge_math.tally(scores, self.thresholds.confidence),
            self.thresholds,
            self.config.challenger_share,
        )
        self.last_challenge = status
        return status

    async def _judge_challenge(self, ranked: Iterable[CompletionRecord]) -> None:
        """After a ranking is stored: promote or retire the challenger once its tally decides."""
        challenge = self._challenge
        if challenge is None or not any(c.policy == challenge.challenger_id for c in ranked):
            return
        outcome = challenge_math.decide((await self._status(challenge)).tally, self.thresholds)
        if outcome is None:
            return
        started = time.perf_counter()
        async with self._admin:
            # Ends it only if it still runs: of two replicas (or rankings) deciding, one acts.
            ended = await asyncio.to_thread(self.store.end_challenge, challenge.seq, outcome)
            await self._reload_challenge()
            if ended is None:
                return
            await self._refresh("policy")
            await self._unload_retired("policy")
        metrics.challenge_decided(outcome)
        if outcome == "promoted":
            metrics.hot_swapped("policy", started)
        log.info("challenge decided: %s %s", challenge.challenger_id, outcome)

    async def export_rankings(self, after: int, limit: int) -> list[RankingExport]:
        return await asyncio.to_thread(self.store.export_rankings, after, self._page(limit))

    async def export_prompts(self, after: int, limit: int) -> list[PromptExport]:
        return await asyncio.to_thread(self.store.export_prompts, after, self._page(limit))

    async def export_demonstrations(self, after: int, limit: int) -> list[DemonstrationExport]:
        return await asyncio.to_thread(self.store.export_demonstrations, after, self._page(limit))

    @staticmethod
    def _page(limit: int) -> int:
        return validation.integer("limit", limit or EXPORT_PAGE, 1, 10 * EXPORT_PAGE)

    async def publish(self, header: PublishHeader, chunks: AsyncIterator[bytes]) -> AdapterVersion:
        """Receive, verify, store under the next version, load and smoke-check, maybe promote.

        Checksum, size and archive errors store nothing. An adapter that loads but fails its
        checks is recorded as "refused" and the live version stays.
        """
        started = time.perf_counter()
        if header.name not in ADAPTER_NAMES:
            raise InvalidRequest(
                f"name must be one of {', '.join(ADAPTER_NAMES)}, got {header.name!r}", field="name"
            )
        if header.challenger and header.promote:
            raise InvalidRequest(
                "give promote or challenger, not both: a challenger goes live when it wins its "
                "challenge",
                field="challenger",
            )
        if header.challenger and header.name != "policy":
            raise InvalidRequest(
                f"only a policy can be a challenger, got name {header.name!r}", field="challenger"
            )
        if header.base_model != self.engine.base_model:
            raise AdapterRefused(
                f"adapter was trained on base model {header.base_model!r}; this server serves "
                f"{self.engine.base_model!r}",
                field="base_model",
            )
        validation.integer("size", header.size, 1, MAX_ADAPTER_BYTES)
        data = bytearray()
        async for chunk in chunks:
            data += chunk
            if len(data) > header.size:
                raise InvalidRequest(
                    f"upload is larger than the declared size {header.size}", field="size"
                )
        if len(data) != header.size:
            raise InvalidRequest(
                f"upload is {len(data)} bytes, the header declared {header.size}", field="size"
            )
        digest = archive.sha256(bytes(data))
        if digest != header.sha256:
            raise InvalidRequest(
                f"checksum mismatch: header says {header.sha256}, received {digest}", field="sha256"
            )
        async with self._admin:
            version = await self._install(header, bytes(data), digest)
        if header.promote:
            metrics.hot_swapped(header.name, started)
        return version

    async def _install(self, header: PublishHeader, data: bytes, digest: str) -> AdapterVersion:
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.adapters_dir))
        try:
            archive.unpack_archive(data, incoming)
        except ValueError as e:
            shutil.rmtree(incoming, ignore_errors=True)
            raise InvalidRequest(str(e), field="data") from e
        # Allocate the version, then rename into place: a crash leaves at worst a stray folder.
        version = await asyncio.to_thread(
            self.store.add_adapter_version,
            header.name,
            sha256=digest,
            path="",
            base_model=header.base_model,
            metrics=dict(header.metrics),
        )
        final = self.adapters_dir / header.name / f"v{version.version}"
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        incoming.rename(final)
        version = await asyncio.to_thread(
            self.store.set_adapter_path, header.name, version.version, str(final)
        )
        try:
            await self.engine.load_adapter(version.id, final, reward=header.name == "reward")
        except AdapterRefused:
            await asyncio.to_thread(
                self.store.set_adapter_state, header.name, version.version, "refused"
            )
            shutil.rmtree(final, ignore_errors=True)
            raise
        self.registry.add(version)
        log.info("adapter %s loaded (sha256 %s)", version.id, digest[:12])
        if header.promote:
            return await self._promote(header.name, version.version)
        if header.challenger:
            await self._start_challenge(version.version)
        return version

    async def promote(self, name: str, version: int) -> AdapterVersion:
        started = time.perf_counter()
        async with self._admin:
            was = self.registry.live().get(name)
            live = await self._promote(name, version)
        if live.id != was:  # promoting the live version again swaps nothing
            metrics.hot_swapped(name, started)
        return live

    async def _promote(self, name: str, version: int) -> AdapterVersion:
        if name not in ADAPTER_NAMES:
            raise InvalidRequest(
                f"name must be one of {', '.join(ADAPTER_NAMES)}, got {name!r}", field="name"
            )
        if f"{name}-v{version}" not in {v.id for v in self.registry.versions(name)} or version == 0:
            raise NotFound(f"{name}-v{version} is not a loaded version", field="version")
        live = await asyncio.to_thread(self.store.promote, name, version)
        await self._refresh(name)
        await self._reload_challenge()  # a promotion by hand ends a challenge of another champion
        log.info("%s is live", live.id)
        await self._unload_retired(name)
        return live

    async def _unload_retired(self, name: str) -> None:
        """Unload retired versions beyond the newest few once nothing runs on them.

        Versions are never reloaded in place, so memory would otherwise grow with every
        promotion. A version still serving requests is retried in the background until drained.
        """
        if not await self._try_unload_retired(name) and name not in self._draining:
            self._draining[name] = asyncio.create_task(self._drain(name))

    async def _try_unload_retired(self, name: str) -> bool:
        retired = [
            v for v in self.registry.versions(name) if v.version > 0 and v.state == "retired"
        ]
        drained = True
        for v in retired[: max(0, len(retired) - self.config.keep_versions)]:
            try:
                await self.engine.unload_adapter(v.id)
            except Conflict:
                drained = False
                continue
            self.registry.remove(v.id)
            log.info("unloaded %s (retired, drained)", v.id)
        return drained

    async def _drain(self, name: str) -> None:
        try:
            for _ in range(DRAIN_ATTEMPTS):
                await asyncio.sleep(DRAIN_POLL_S)
                async with self._admin:
                    if await self._try_unload_retired(name):
                        return
            log.warning("retired %s versions still serving after %d attempts", name, DRAIN_ATTEMPTS)
        finally:
            self._draining.pop(name, None)

    async def _refresh(self, name: str) -> None:
        self.registry.refresh(name, await asyncio.to_thread(self.store.list_adapter_versions, name))

    async def rollback(self, name: str) -> AdapterVersion:
        if name not in ADAPTER_NAMES:
            raise InvalidRequest(
                f"name must be one of {', '.join(ADAPTER_NAMES)}, got {name!r}", field="name"
            )
        started = time.perf_counter()
        async with self._admin:
            # Only the policy has something to fall back to (the base model, policy-v0).
            live = await asyncio.to_thread(self.store.rollback, name, allow_empty=name == "policy")
            if live is not None and live.id not in {v.id for v in self.registry.versions(name)}:
                # Unloaded since it retired: load it again before the alias moves to it.
                await self.engine.load_adapter(live.id, live.path, reward=name == "reward")
                self.registry.add(live)
            await self._refresh(name)
            await self._reload_challenge()
            metrics.hot_swapped(name, started)
            if live is None:
                return self.registry.versions(name)[0]
            log.info("rolled back: %s is live", live.id)
            return live


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
        service: FlywheelService,
        prompt: PromptRecord,
        prompt_ids: tuple[int, ...],
        sampling: Sampling,
        rows: list[_Row],
    ) -> None:
        self.service = service
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.rows = rows
        self._batches: AsyncGenerator[list[StreamEvent], None] = self._run()
        self._buffer: collections.deque[StreamEvent] = collections.deque()
        self.result: Generation

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

    async def _run(self) -> AsyncGenerator[list[StreamEvent], None]:
        groups: dict[str | None, list[_Row]] = {}
        for row in self.rows:
            groups.setdefault(row.adapter, []).append(row)
        held: list[StreamEvent] = []
        for adapter, rows in groups.items():
            request = EngineRequest(
                self.prompt_ids, len(rows), self._group_sampling(rows[0].index), adapter
            )
            async for events in self.service.engine.generate_batches(request):
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
        await self.service.recorder.record(self.prompt, completions)
        metrics.generated(completions)
        self.result = Generation(self.prompt.id, len(self.prompt_ids), completions)
        if held:
            yield held

    def _group_sampling(self, first_index: int) -> Sampling:
        s = self.sampling
        if s.seed is None or first_index == 0:
            return s
        return Sampling(s.temperature, s.top_p, s.top_k, s.max_tokens, s.stop, s.seed + first_index)

    def _apply(self, row: _Row, event: TokenEvent) -> StreamEvent:
        row.text += event.delta
        row.tokens = event.completion_tokens
        if event.finish_reason is not None:
            row.finish_reason = event.finish_reason
        return StreamEvent(
            self.prompt.id, row.id, row.index, event.delta, event.finish_reason, row.policy
        )


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
