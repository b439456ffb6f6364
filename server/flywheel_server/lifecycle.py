"""The adapter lifecycle: publish (receive, verify, store, load, smoke-check), promote, roll
back, follow the shared store, run champion / challenger, and unload a retired version once the
last request on it has finished.

Every change of which version is live goes through here, under one lock. The registry counts the
requests on each version; a retired version beyond the newest `keep_versions` is unloaded when
its count reaches zero (an event, not a poll).
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flywheel_proto import archive
from flywheel_server import challenge as challenge_math
from flywheel_server import metrics, validation
from flywheel_server.audit import AuditTrail
from flywheel_server.config import ServerConfig
from flywheel_server.domain import (
    ADAPTER_NAMES,
    AdapterVersion,
    Challenge,
    ChallengeStatus,
    CompletionRecord,
)
from flywheel_server.engine_api import Engine
from flywheel_server.errors import AdapterRefused, Conflict, InvalidRequest, NotFound
from flywheel_server.registry import AdapterRegistry
from flywheel_server.store import Store

log = logging.getLogger(__name__)

MAX_ADAPTER_BYTES = 2 << 30


@dataclass(frozen=True)
class PublishHeader:
    name: str
    base_model: str
    sha256: str
    size: int
    metrics: dict[str, float] = field(default_factory=dict)
    promote: bool = False
    challenger: bool = False  # a policy that challenges the live one (not with promote)


class AdapterLifecycle:
    def __init__(
        self, engine: Engine, store: Store, registry: AdapterRegistry, config: ServerConfig
    ) -> None:
        self.engine = engine
        self.store = store
        self.registry = registry
        self.config = config
        self.audit = AuditTrail(store)
        self.adapters_dir = config.data_dir / "adapters"
        self._admin = asyncio.Lock()
        self._unloading: dict[str, asyncio.Task[None]] = {}  # by version id: waits for idle
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

    # -- start-up and replicas --------------------------------------------------------------

    async def start(self, *, seed_reward: Path | None = None) -> None:
        """Load every stored version that is not refused; seed the initial reward model
        (`--reward`, the demo's when serving the demo) once, into an empty store."""
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

    # -- publish, promote, roll back -------------------------------------------------------

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
            try:
                version = await self._install(header, bytes(data), digest)
            except AdapterRefused as e:
                await self.audit.record("publish", header.name, f"refused: {e.message}")
                raise
        await self.audit.record("publish", version.id, version.state)
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
        await self.audit.record("promote", live.id, f"was {was}")
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
            now_live = self.registry.versions(name)[0] if live is None else live
            await self.audit.record("rollback", now_live.id)
            log.info("rolled back: %s is live", now_live.id)
            return now_live

    async def _refresh(self, name: str) -> None:
        self.registry.refresh(name, await asyncio.to_thread(self.store.list_adapter_versions, name))

    # -- unloading retired versions ----------------------------------------------------------

    async def _unload_retired(self, name: str) -> None:
        """Unload retired versions beyond the newest `keep_versions`: now if no request runs on
        them, else when the last one finishes. Versions are never reloaded in place, so memory
        would otherwise grow with every promotion."""
        retired = [
            v for v in self.registry.versions(name) if v.version > 0 and v.state == "retired"
        ]
        for v in retired[: max(0, len(retired) - self.config.keep_versions)]:
            if self.registry.in_use(v.id):
                if v.id not in self._unloading:
                    self._unloading[v.id] = asyncio.create_task(self._unload_when_idle(v.id))
                continue
            await self._unload(v.id)

    async def _unload_when_idle(self, adapter_id: str) -> None:
        try:
            await self.registry.idle(adapter_id)
            async with self._admin:
                still = [v for v in self.registry.versions() if v.id == adapter_id]
                if still and still[0].state == "retired" and not self.registry.in_use(adapter_id):
                    await self._unload(adapter_id)
                    # rolled back to meanwhile, or busy again: the next change looks again
        finally:
            self._unloading.pop(adapter_id, None)

    async def _unload(self, adapter_id: str) -> None:
        try:
            await self.engine.unload_adapter(adapter_id)
        except Conflict:  # the engine still holds rows of it: the next change retries
            log.warning("%s still has rows in the engine; not unloaded", adapter_id)
            return
        self.registry.remove(adapter_id)
        log.info("unloaded %s (retired, drained)", adapter_id)

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
            action = "challenge_stop" if stop else "challenge"
            await self.audit.record(action, challenge.challenger_id, f"of {challenge.champion_id}")
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

    async def judge_challenge(self, ranked: Iterable[CompletionRecord]) -> None:
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
        await self.audit.record(
            "challenge_decided", challenge.challenger_id, outcome, actor="challenge"
        )
        metrics.challenge_decided(outcome)
        if outcome == "promoted":
            metrics.hot_swapped("policy", started)
        log.info("challenge decided: %s %s", challenge.challenger_id, outcome)

    def draw_challenge(self) -> Challenge | None:
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


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
