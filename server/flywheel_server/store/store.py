"""The Store: one SQLAlchemy engine, migrated to head on open, safe to call from many threads.

Every public method is one transaction. The async server calls them through asyncio.to_thread.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, cast, get_args

from sqlalchemy import Engine, func, select, text, true, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from flywheel_server.domain import (
    ADAPTER_NAMES,
    AdapterState,
    AdapterVersion,
    AuditEntry,
    Challenge,
    ChallengeOutcome,
    CompletionRecord,
    Demonstration,
    DemonstrationExport,
    DemonstrationReceipt,
    FinishReason,
    PromptExport,
    PromptRecord,
    RankedCompletion,
    Ranking,
    RankingExport,
    RankingReceipt,
    Sampling,
    now,
)
from flywheel_server.errors import AdapterNotFound, Conflict, InvalidRequest, Unavailable
from flywheel_server.store import database
from flywheel_server.store.schema import (
    AdapterVersionRow,
    AuditRow,
    Base,
    ChallengePromptRow,
    ChallengeRow,
    CompletionRow,
    DemonstrationRow,
    PromotionRow,
    PromptRow,
    RankingItemRow,
    RankingRow,
)
from flywheel_server.store.tasks import TaskQueue, finish_claim

log = logging.getLogger("flywheel.store")

MAX_KEY_CHARS = 256  # matches schema.KEY
ADAPTER_STATES: tuple[str, ...] = get_args(AdapterState)
CHALLENGE_ENDINGS: tuple[str, ...] = tuple(o for o in get_args(ChallengeOutcome) if o != "running")
RankedPolicies = tuple[tuple[str, int], ...]  # (policy id, tier) of each ranked completion
_COUNTED: tuple[type[Base], ...] = (
    PromptRow,
    CompletionRow,
    RankingRow,
    RankingItemRow,
    DemonstrationRow,
    AdapterVersionRow,
)


class Store(TaskQueue):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{database.WRITE: True})
        self._postgres = engine.dialect.name == "postgresql"
        # An in-memory SQLite database is one shared connection: take turns on it.
        self._turns: AbstractContextManager[Any] = (
            threading.Lock() if isinstance(engine.pool, StaticPool) else nullcontext()
        )

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect to `url` (sqlite:///path or postgresql://...) and migrate the schema to head."""
        engine = database.create(make_url(url))
        try:
            database.upgrade_to_head(engine)
        except Exception:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        self._engine.dispose()

    # --- generations ------------------------------------------------------------------------

    def record_generation(
        self, prompt: PromptRecord, completions: Sequence[CompletionRecord]
    ) -> None:
        self.record_generations([(prompt, completions)])

    def record_generations(
        self, generations: Sequence[tuple[PromptRecord, Sequence[CompletionRecord]]]
    ) -> None:
        """Several generations in one transaction (the server's group commit: one fsync)."""
        for prompt, completions in generations:
            for c in completions:
                if c.prompt_id != prompt.id:
                    raise InvalidRequest(
                        f"completion {c.id} belongs to prompt {c.prompt_id}, not to {prompt.id}"
                    )
        try:
            with self._write(PromptRow) as s:
                s.add_all(_prompt_row(prompt) for prompt, _ in generations)
                s.flush()  # the prompt rows must exist before their completions reference them
                s.add_all(_completion_row(c) for _, completions in generations for c in completions)
                s.add_all(
                    ChallengePromptRow(prompt_id=prompt.id, challenge=prompt.challenge)
                    for prompt, _ in generations
                    if prompt.challenge is not None
                )
        except IntegrityError as e:
            ids = ", ".join(prompt.id for prompt, _ in generations)
            raise Conflict(
                f"generations for prompts {ids} were not stored: an id is already taken"
            ) from e

    def get_completions(self, ids: Sequence[str]) -> dict[str, CompletionRecord]:
        if not ids:
            return {}
        with self._read() as s:
            rows = s.scalars(select(CompletionRow).where(CompletionRow.id.in_(set(ids)))).all()
            return {row.id: _completion_record(row) for row in rows}

    def comparison(self, prompt_id: str) -> list[CompletionRecord]:
        """The candidates of a comparison, in the order they were shown."""
        with self._read() as s:
            rows = s.scalars(
                select(CompletionRow)
                .where(CompletionRow.prompt_id == prompt_id)
                .order_by(CompletionRow.index)
            ).all()
            return [_completion_record(row) for row in rows]

    # --- feedback ---------------------------------------------------------------------------

    def add_ranking(self, ranking: Ranking, prompt_id: str) -> RankingReceipt:
        """Store a ranking once per idempotency key; a replay returns the first receipt."""
        _check_key("labeler", ranking.labeler)
        _check_key("idempotency_key", ranking.idempotency_key)
        try:
            with self._write(RankingRow) as s:
                first = self._ranking_by_key(s, ranking.idempotency_key)
                if first is not None:
                    _same_labeler(first.labeler, ranking.labeler, ranking.idempotency_key)
                    return _ranking_receipt(first, duplicate=True)
                row = RankingRow(
                    id=f"rnk-{uuid.uuid4().hex}",
                    prompt_id=prompt_id,
                    labeler=ranking.labeler,
                    idempotency_key=ranking.idempotency_key,
                    pairs=ranking.pairs,
                    created_at=now(),
                )
                s.add(row)
                s.flush()
                s.add_all(
                    RankingItemRow(ranking_id=row.id, completion_id=cid, tier=tier)
                    for tier, ids in enumerate(ranking.tiers)
                    for cid in ids
                )
                finish_claim(s, prompt_id, ranking.labeler, row.id, row.created_at)
                s.flush()
                return _ranking_receipt(row, duplicate=False)
        except IntegrityError as e:
            return self._replay_ranking(ranking.idempotency_key, ranking.labeler, e)

    def _replay_ranking(self, key: str, labeler: str, error: IntegrityError) -> RankingReceipt:
        # Another writer stored this key between our check and our insert: theirs is the first.
        with self._read() as s:
            first = self._ranking_by_key(s, key)
            if first is not None:
                _same_labeler(first.labeler, labeler, key)
                return _ranking_receipt(first, duplicate=True)
        raise InvalidRequest(
            f"ranking with idempotency_key {key!r} was not stored: it names a prompt or completion "
            f"the store does not hold, or names a completion twice ({error.orig})"
        ) from error

    @staticmethod
    def _ranking_by_key(s: Session, key: str) -> RankingRow | None:
        return s.scalars(select(RankingRow).where(RankingRow.idempotency_key == key)).first()

    def add_demonstration(self, demo: Demonstration) -> DemonstrationReceipt:
        """Store a demonstration once per idempotency key; a replay returns the first receipt."""
        _check_key("labeler", demo.labeler)
        _check_key("idempotency_key", demo.idempotency_key)
        try:
            with self._write(DemonstrationRow) as s:
                first = self._demonstration_by_key(s, demo.idempotency_key)
                if first is not None:
                    _same_labeler(first.labeler, demo.labeler, demo.idempotency_key)
                    return DemonstrationReceipt(first.id, duplicate=True)
                row = DemonstrationRow(
                    id=f"dem-{uuid.uuid4().hex}",
                    prompt=demo.prompt,
                    response=demo.response,
                    labeler=demo.labeler,
                    idempotency_key=demo.idempotency_key,
                    created_at=now(),
                )
                s.add(row)
                s.flush()
                return DemonstrationReceipt(row.id)
        except IntegrityError:
            with self._read() as s:
                first = self._demonstration_by_key(s, demo.idempotency_key)
                if first is not None:
                    _same_labeler(first.labeler, demo.labeler, demo.idempotency_key)
                    return DemonstrationReceipt(first.id, duplicate=True)
            raise

    @staticmethod
    def _demonstration_by_key(s: Session, key: str) -> DemonstrationRow | None:
        query = select(DemonstrationRow).where(DemonstrationRow.idempotency_key == key)
        return s.scalars(query).first()

    # --- the audit trail ---------------------------------------------------------------------

    def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append entries (their `at`, or now); values longer than a column are cut to fit."""
        with self._write(AuditRow) as s:
            s.add_all(
                AuditRow(
                    at=e.at or now(),
                    actor=e.actor[:MAX_KEY_CHARS],
                    action=e.action[:32],
                    target=e.target[:64],
                    detail=e.detail,
                )
                for e in entries
            )

    def export_audit(self, after: int, limit: int) -> list[AuditEntry]:
        _check_page(after, limit)
        query = select(AuditRow).where(AuditRow.seq > after).order_by(AuditRow.seq).limit(limit)
        with self._read() as s:
            return [
                AuditEntry(r.actor, r.action, r.target, r.detail, r.at, r.seq)
                for r in s.scalars(query)
            ]

    # --- export (cursor = seq) --------------------------------------------------------------

    def export_rankings(self, after: int, limit: int) -> list[RankingExport]:
        _check_page(after, limit)
        with self._read() as s:
            return self._rankings(s, RankingRow.seq > after, RankingRow.seq, limit)

    def newest_rankings(self, limit: int) -> list[RankingExport]:
        """The newest `limit` rankings, oldest first (the dashboard's window)."""
        _check_page(0, limit)
        with self._read() as s:
            return self._rankings(s, true(), RankingRow.seq.desc(), limit)[::-1]

    def _rankings(self, s: Session, where: Any, order: Any, limit: int) -> list[RankingExport]:
        rows = s.execute(
            select(RankingRow, PromptRow.text, PromptRow.user, PromptRow.messages)
            .join(PromptRow, PromptRow.id == RankingRow.prompt_id)
            .where(where)
            .order_by(order)
            .limit(limit)
        ).all()
        ranked = self._ranked_completions(s, [r.id for r, _, _, _ in rows])
        return [
            RankingExport(
                cursor=r.seq,
                ranking_id=r.id,
                prompt_id=r.prompt_id,
                prompt=prompt_text,
                completions=tuple(ranked.get(r.id, [])),
                labeler=r.labeler,
                created_at=r.created_at,
                user=user,
                messages=messages,
            )
            for r, prompt_text, user, messages in rows
        ]

    @staticmethod
    def _ranked_completions(
        s: Session, ranking_ids: list[str]
    ) -> dict[str, list[RankedCompletion]]:
        if not ranking_ids:
            return {}
        rows = s.execute(
            select(RankingItemRow.ranking_id, RankingItemRow.tier, CompletionRow)
            .join(CompletionRow, CompletionRow.id == RankingItemRow.completion_id)
            .where(RankingItemRow.ranking_id.in_(ranking_ids))
            .order_by(RankingItemRow.tier, CompletionRow.index, CompletionRow.id)
        ).all()
        ranked: dict[str, list[RankedCompletion]] = {}
        for ranking_id, tier, c in rows:
            ranked.setdefault(ranking_id, []).append(
                RankedCompletion(completion_id=c.id, text=c.text, policy=c.policy, tier=tier)
            )
        return ranked

    def export_prompts(self, after: int, limit: int) -> list[PromptExport]:
        _check_page(after, limit)
        query = select(PromptRow).where(PromptRow.seq > after).order_by(PromptRow.seq).limit(limit)
        with self._read() as s:
            return [
                PromptExport(
                    cursor=p.seq,
                    prompt_id=p.id,
                    prompt=p.text,
                    created_at=p.created_at,
                    user=p.user,
                )
                for p in s.scalars(query)
            ]

    def export_demonstrations(self, after: int, limit: int) -> list[DemonstrationExport]:
        _check_page(after, limit)
        query = (
            select(DemonstrationRow)
            .where(DemonstrationRow.seq > after)
            .order_by(DemonstrationRow.seq)
            .limit(limit)
        )
        with self._read() as s:
            return [
                DemonstrationExport(
                    cursor=d.seq,
                    demonstration_id=d.id,
                    prompt=d.prompt,
                    response=d.response,
                    labeler=d.labeler,
                    created_at=d.created_at,
                )
                for d in s.scalars(query)
            ]

    def counts(self) -> dict[str, int]:
        with self._read() as s:
            return {
                model.__tablename__: s.scalar(select(func.count()).select_from(model)) or 0
                for model in _COUNTED
            }

    # --- adapter versions -------------------------------------------------------------------

    def add_adapter_version(
        self,
        name: str,
        *,
        sha256: str,
        path: str,
        base_model: str,
        metrics: Mapping[str, float],
        state: str = "ready",
    ) -> AdapterVersion:
        """Record the next version (1, 2, ...) of `name`. Only promote() makes a version live."""
        _check_name(name)
        _check_state(state, allow_live=False)
        clean_metrics = _check_metrics(metrics)
        with self._write(AdapterVersionRow) as s:
            latest = s.scalar(
                select(func.max(AdapterVersionRow.version)).where(AdapterVersionRow.name == name)
            )
            row = AdapterVersionRow(
                name=name,
                version=(latest or 0) + 1,
                state=state,
                sha256=sha256,
                path=path,
                base_model=base_model,
                metrics=clean_metrics,
                created_at=now(),
            )
            s.add(row)
            s.flush()
            return _adapter_version(row)

    def set_adapter_state(self, name: str, version: int, state: str) -> AdapterVersion:
        _check_state(state, allow_live=False)
        with self._write(AdapterVersionRow) as s:
            row = _adapter_row(s, name, version)
            row.state = state
            s.flush()
            return _adapter_version(row)

    def set_adapter_path(self, name: str, version: int, path: str) -> AdapterVersion:
        """Record where a version's files ended up (they are renamed into place after allocation)."""
        with self._write(AdapterVersionRow) as s:
            row = _adapter_row(s, name, version)
            row.path = path
            s.flush()
            return _adapter_version(row)

    def get_adapter_version(self, name: str, version: int) -> AdapterVersion | None:
        with self._read() as s:
            row = s.get(AdapterVersionRow, (name, version))
            return None if row is None else _adapter_version(row)

    def list_adapter_versions(self, name: str | None = None) -> list[AdapterVersion]:
        query = select(AdapterVersionRow).order_by(
            AdapterVersionRow.name, AdapterVersionRow.version
        )
        if name is not None:
            query = query.where(AdapterVersionRow.name == name)
        with self._read() as s:
            return [_adapter_version(row) for row in s.scalars(query)]

    def live_version(self, name: str) -> AdapterVersion | None:
        query = select(AdapterVersionRow).where(
            AdapterVersionRow.name == name, AdapterVersionRow.state == "live"
        )
        with self._read() as s:
            row = s.scalars(query).first()
            return None if row is None else _adapter_version(row)

    def promote(self, name: str, version: int) -> AdapterVersion:
        """Make `version` the live one (the previous live one retires) and push it on the history."""
        with self._write(AdapterVersionRow, PromotionRow, ChallengeRow) as s:
            return _promote(s, name, version)

    def rollback(self, name: str, *, allow_empty: bool = True) -> AdapterVersion | None:
        """Pop the latest promotion of `name` and make the one before it live again.

        Popping the only promotion leaves no version live (None): for the policy that means
        the bare base model serves again. With allow_empty=False that is refused instead.
        """
        with self._write(AdapterVersionRow, PromotionRow, ChallengeRow) as s:
            stack = s.scalars(
                select(PromotionRow)
                .where(PromotionRow.name == name, PromotionRow.rolled_back.is_(False))
                .order_by(PromotionRow.seq.desc())
                .limit(2)
            ).all()
            if not stack:
                raise Conflict(f"no promoted version of {name} to roll back")
            if len(stack) == 1:
                if not allow_empty:
                    raise Conflict(f"no earlier live version of {name} to roll back to")
                stack[0].rolled_back = True
                _retire_live(s, name)
                _follow_live(s, name, 0)
                return None
            latest, previous = stack
            target = _adapter_row(s, name, previous.version)
            if target.state == "refused":
                raise Conflict(
                    f"cannot roll back {name} to {name}-v{target.version}: it has since been refused"
                )
            latest.rolled_back = True
            _make_live(s, name, target.version)
            _follow_live(s, name, target.version)
            return _adapter_version(target)

    # --- champion / challenger --------------------------------------------------------------

    def start_challenge(self, challenger: int) -> Challenge:
        """Challenge the live policy (the champion; 0 = the base model) with a ready version.

        A running challenge ends "stopped" first: at most one runs.
        """
        with self._write(AdapterVersionRow, ChallengeRow) as s:
            row = _adapter_row(s, "policy", challenger)
            if row.state != "ready":
                raise Conflict(
                    f"policy-v{challenger} is {row.state}; only a ready version can be a challenger",
                    field="version",
                )
            live = s.scalar(
                select(AdapterVersionRow.version).where(
                    AdapterVersionRow.name == "policy", AdapterVersionRow.state == "live"
                )
            )
            running = _running_challenge(s)
            if running is not None:
                _end(running, "stopped")
                s.flush()  # the partial unique index allows one running challenge at any instant
            challenge = ChallengeRow(
                challenger=challenger, champion=live or 0, outcome="running", started_at=now()
            )
            s.add(challenge)
            s.flush()
            return _challenge(challenge)

    def running_challenge(self) -> Challenge | None:
        with self._read() as s:
            row = _running_challenge(s)
            return None if row is None else _challenge(row)

    def latest_challenge(self) -> Challenge | None:
        """The running challenge, else the one that began last."""
        with self._read() as s:
            row = s.scalars(select(ChallengeRow).order_by(ChallengeRow.seq.desc()).limit(1)).first()
            return None if row is None else _challenge(row)

    def challenge_rankings(self, challenge: Challenge) -> list[RankedPolicies]:
        """The rankings of the challenge's blind comparisons, oldest first; for one that ended,
        those stored until it ended (so its final tally stays as it was decided)."""
        query = (
            select(RankingRow.id, RankingItemRow.tier, CompletionRow.policy)
            .join(ChallengePromptRow, ChallengePromptRow.prompt_id == RankingRow.prompt_id)
            .join(RankingItemRow, RankingItemRow.ranking_id == RankingRow.id)
            .join(CompletionRow, CompletionRow.id == RankingItemRow.completion_id)
            .where(ChallengePromptRow.challenge == challenge.seq)
            .order_by(RankingRow.seq, RankingItemRow.tier, CompletionRow.index)
        )
        if challenge.ended_at is not None:
            query = query.where(RankingRow.created_at <= challenge.ended_at)
        rankings: dict[str, list[tuple[str, int]]] = {}
        with self._read() as s:
            for ranking_id, tier, policy in s.execute(query):
                rankings.setdefault(ranking_id, []).append((policy, tier))
        return [tuple(items) for items in rankings.values()]

    def end_challenge(self, seq: int, outcome: str) -> Challenge | None:
        """End a running challenge: "promoted" makes the challenger live (as promote() does),
        "retired" retires it, "stopped" leaves it ready. None when it no longer runs (another
        replica, or a promotion by hand, ended it first)."""
        if outcome not in CHALLENGE_ENDINGS:
            raise InvalidRequest(
                f"outcome must be one of {list(CHALLENGE_ENDINGS)}, got {outcome!r}",
                field="outcome",
            )
        with self._write(AdapterVersionRow, PromotionRow, ChallengeRow) as s:
            row = s.get(ChallengeRow, seq)
            if row is None or row.outcome != "running":
                return None
            _end(row, outcome)
            if outcome == "promoted":
                _promote(s, "policy", row.challenger)
            elif outcome == "retired":
                version = _adapter_row(s, "policy", row.challenger)
                if version.state == "ready":
                    version.state = "retired"
            s.flush()
            return _challenge(row)

    # --- transactions -----------------------------------------------------------------------

    def ping(self) -> bool:
        """Whether the database answers now (readiness: /readyz, gRPC health)."""
        try:
            with self._read() as s:
                s.execute(text("SELECT 1"))
        except Unavailable:
            return False
        return True

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with _outage(), self._turns, Session(self._engine) as s, s.begin():
            yield s

    @contextmanager
    def _write(self, *serialised: type[Base]) -> Iterator[Session]:
        with (
            _outage(),
            self._turns,
            Session(self._writer, expire_on_commit=False) as s,
            s.begin(),
        ):
            if self._postgres:
                # Cursors are sequence values: taken in commit order, a reader paging with
                # `after` can never skip a row that commits late. Readers are not blocked.
                for model in serialised:
                    s.execute(text(f"LOCK TABLE {model.__tablename__} IN EXCLUSIVE MODE"))
            yield s


@contextmanager
def _outage() -> Iterator[None]:
    """A database that cannot be reached (a failover, a restart, a cut network, a full disk) is
    503 / UNAVAILABLE, not a crash: the transaction did not commit, or, if the connection broke
    during the commit, a retry with the same idempotency key finds what was stored."""
    try:
        yield
    except (OperationalError, InterfaceError) as e:
        log.error("database unavailable: %s", str(e.orig or e).strip().splitlines()[0][:300])
        raise Unavailable(  # the driver's text (host, user) stays in the log
            "the database is unavailable; retry later, with the same idempotency_key for feedback"
        ) from e


# --- rows <-> values --------------------------------------------------------------------------


def _prompt_row(p: PromptRecord) -> PromptRow:
    return PromptRow(id=p.id, text=p.text, kind=p.kind, created_at=p.created_at, user=p.user,
                     messages=p.messages)  # fmt: skip


def _completion_row(c: CompletionRecord) -> CompletionRow:
    return CompletionRow(
        id=c.id,
        prompt_id=c.prompt_id,
        index=c.index,
        text=c.text,
        finish_reason=c.finish_reason,
        policy=c.policy,
        sampling=c.sampling.as_dict(),
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        created_at=c.created_at,
    )


def _completion_record(row: CompletionRow) -> CompletionRecord:
    sampling = dict(row.sampling)
    sampling["stop"] = tuple(sampling.get("stop", ()))
    sampling["logit_bias"] = tuple((int(t), b) for t, b in sampling.get("logit_bias", {}).items())
    return CompletionRecord(
        id=row.id,
        prompt_id=row.prompt_id,
        index=row.index,
        text=row.text,
        finish_reason=cast(FinishReason, row.finish_reason),
        policy=row.policy,
        sampling=Sampling(**sampling),
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        created_at=row.created_at,
    )


def _ranking_receipt(row: RankingRow, *, duplicate: bool) -> RankingReceipt:
    return RankingReceipt(
        ranking_id=row.id, prompt_id=row.prompt_id, pairs=row.pairs, duplicate=duplicate
    )


def _adapter_version(row: AdapterVersionRow) -> AdapterVersion:
    return AdapterVersion(
        name=row.name,
        version=row.version,
        state=cast(AdapterState, row.state),
        sha256=row.sha256,
        path=row.path,
        base_model=row.base_model,
        metrics=dict(row.metrics),
        created_at=row.created_at,
    )


def _adapter_row(s: Session, name: str, version: int) -> AdapterVersionRow:
    row = s.get(AdapterVersionRow, (name, version))
    if row is None:
        known = s.scalars(
            select(AdapterVersionRow.version).where(AdapterVersionRow.name == name)
        ).all()
        raise AdapterNotFound(
            f"no adapter version {name}-v{version}; known versions of {name}: {list(known) or 'none'}"
        )
    return row


def _challenge(row: ChallengeRow) -> Challenge:
    return Challenge(
        seq=row.seq,
        challenger=row.challenger,
        champion=row.champion,
        outcome=cast(ChallengeOutcome, row.outcome),
        started_at=row.started_at,
        ended_at=row.ended_at,
    )


def _running_challenge(s: Session) -> ChallengeRow | None:
    return s.scalars(select(ChallengeRow).where(ChallengeRow.outcome == "running")).first()


def _end(row: ChallengeRow, outcome: str) -> None:
    row.outcome = outcome
    row.ended_at = now()


def _follow_live(s: Session, name: str, live: int) -> None:
    """The live policy moved to `live`: a running challenge of another champion is over."""
    if name != "policy":
        return
    running = _running_challenge(s)
    if running is not None and live != running.champion:
        _end(running, "promoted" if live == running.challenger else "stopped")


def _promote(s: Session, name: str, version: int) -> AdapterVersion:
    row = _adapter_row(s, name, version)
    if row.state == "refused":
        raise Conflict(f"{name}-v{version} was refused and cannot be promoted")
    if row.state == "live":
        return _adapter_version(row)
    _make_live(s, name, version)
    s.add(PromotionRow(name=name, version=version, rolled_back=False, at=now()))
    _follow_live(s, name, version)
    return _adapter_version(row)


def _retire_live(s: Session, name: str) -> None:
    s.execute(
        update(AdapterVersionRow)
        .where(AdapterVersionRow.name == name, AdapterVersionRow.state == "live")
        .values(state="retired")
    )


def _make_live(s: Session, name: str, version: int) -> None:
    # Retire first: the partial unique index allows one live version per name at any instant.
    _retire_live(s, name)
    s.execute(
        update(AdapterVersionRow)
        .where(AdapterVersionRow.name == name, AdapterVersionRow.version == version)
        .values(state="live")
    )


# --- argument checks --------------------------------------------------------------------------


def _check_key(field: str, value: str) -> None:
    if not value or len(value) > MAX_KEY_CHARS:
        raise InvalidRequest(
            f"{field} must be 1 to {MAX_KEY_CHARS} characters, got {len(value)}", field=field
        )


def _check_page(after: int, limit: int) -> None:
    if after < 0:
        raise InvalidRequest(f"after must be a cursor >= 0, got {after}", field="after")
    if limit < 1:
        raise InvalidRequest(f"limit must be at least 1, got {limit}", field="limit")


def _check_name(name: str) -> None:
    if name not in ADAPTER_NAMES:
        raise InvalidRequest(
            f"adapter name must be one of {list(ADAPTER_NAMES)}, got {name!r}", field="name"
        )


def _check_state(state: str, *, allow_live: bool) -> None:
    allowed = [s for s in ADAPTER_STATES if allow_live or s != "live"]
    if state not in allowed:
        hint = " (use promote() to make a version live)" if state == "live" else ""
        raise InvalidRequest(f"state must be one of {allowed}, got {state!r}{hint}", field="state")


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        number = float(value)
        if not math.isfinite(number):
            raise InvalidRequest(
                f"metrics[{key!r}] must be a finite number, got {value}", field="metrics"
            )
        clean[key] = number
    return clean


__all__ = ["Store"]


def _same_labeler(first: str, labeler: str, key: str) -> None:
    """A replay is the same labeler's: another's reuse of a key must not pass for a duplicate
    (its feedback would be dropped, and it would learn the first one's receipt)."""
    if first != labeler:
        raise Conflict(
            f"idempotency_key {key!r} was already used by another labeler; use keys of your own",
            field="idempotency_key",
        )
