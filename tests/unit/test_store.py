"""The Store on SQLite and PostgreSQL: round trips, idempotency, cursors, durability, adapters."""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from flywheel_server.domain import (
    AuditEntry,
    CompletionRecord,
    Demonstration,
    PromptRecord,
    Ranking,
    Sampling,
)
from flywheel_server.errors import Conflict, InvalidRequest, NotFound
from flywheel_server.store import Store
from flywheel_server.store.schema import Base, RankingRow

pytestmark = pytest.mark.unit

POSTGRES_DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_url() -> str:
    return os.environ.get("FLYWHEEL_TEST_POSTGRES_URL", POSTGRES_DEFAULT_URL)


@functools.cache
def _postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    url = _postgres_url()
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return None
    except Exception as e:
        return (
            f"PostgreSQL at {make_url(url)!r} is unreachable (set FLYWHEEL_TEST_POSTGRES_URL): {e}"
        )
    finally:
        engine.dispose()


def _fresh_postgres_schema() -> Iterator[str]:
    """A URL whose search_path is a new, empty schema, dropped afterwards."""
    reason = _postgres_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"flywheel_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_postgres_url())
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = make_url(_postgres_url()).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'flywheel.db'}"
    else:
        yield from _fresh_postgres_schema()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def _generate(store: Store, n: int = 3, policy: str = "policy-v1") -> list[CompletionRecord]:
    prompt = PromptRecord(id=f"prm-{uuid.uuid4().hex}", text="Say hi", kind="text")
    completions = [
        CompletionRecord(
            id=f"cmp-{uuid.uuid4().hex}",
            prompt_id=prompt.id,
            index=i,
            text=f"answer {i}",
            finish_reason="stop" if i % 2 == 0 else "length",
            policy=policy,
            sampling=Sampling(temperature=0.7, top_p=0.9, top_k=40, stop=("\n", "END"), seed=i),
            prompt_tokens=3,
            completion_tokens=5 + i,
        )
        for i in range(n)
    ]
    store.record_generation(prompt, completions)
    return completions


def _rank(cs: list[CompletionRecord], key: str, order: list[list[int]]) -> Ranking:
    """A ranking by alice; `order` lists tiers of indices into `cs`, best first."""
    tiers = tuple(tuple(cs[i].id for i in tier) for tier in order)
    return Ranking(tiers=tiers, labeler="alice", idempotency_key=key)


# --- generations ---------------------------------------------------------------------------


def test_generation_round_trip(store: Store) -> None:
    completions = _generate(store, n=2)
    got = store.get_completions([c.id for c in completions])
    assert got == {c.id: c for c in completions}
    [prompt] = store.export_prompts(after=0, limit=10)
    assert (prompt.prompt_id, prompt.prompt) == (completions[0].prompt_id, "Say hi")
    assert store.counts()["completions"] == 2


def test_generations_commit_together_or_not_at_all(store: Store) -> None:
    first, second = _generate(store, n=2), _generate(store, n=1)
    fresh = PromptRecord(id=f"prm-{uuid.uuid4().hex}", text="again", kind="text")
    ok = [
        CompletionRecord(
            f"cmp-{uuid.uuid4().hex}", fresh.id, 0, "x", "stop", "policy-v0", Sampling(), 1, 1
        )
    ]
    taken = PromptRecord(id=first[0].prompt_id, text="dup", kind="text")  # an id already stored
    before = store.counts()
    with pytest.raises(Conflict, match="not stored"):
        store.record_generations([(fresh, ok), (taken, [])])
    assert store.counts() == before  # the good one was not half-written either
    store.record_generations([(fresh, ok)])
    assert store.counts()["prompts"] == before["prompts"] + 1
    assert set(store.get_completions([ok[0].id, second[0].id])) == {ok[0].id, second[0].id}


def test_get_completions_returns_only_known_ids(store: Store) -> None:
    completions = _generate(store, n=2)
    got = store.get_completions([completions[1].id, "cmp-unknown"])
    assert list(got) == [completions[1].id]
    assert store.get_completions(["cmp-unknown"]) == {}
    assert store.get_completions([]) == {}


# --- rankings ------------------------------------------------------------------------------


def test_ranking_export_shows_tiers_and_texts(store: Store) -> None:
    cs = _generate(store, n=3)
    receipt = store.add_ranking(_rank(cs, "k1", [[2], [0, 1]]), cs[0].prompt_id)
    assert receipt.ranking_id.startswith("rnk-") and not receipt.duplicate
    assert receipt.pairs == 2
    [export] = store.export_rankings(after=0, limit=10)
    assert export.ranking_id == receipt.ranking_id
    assert (export.prompt_id, export.prompt, export.labeler) == (cs[0].prompt_id, "Say hi", "alice")
    assert [(c.completion_id, c.text, c.policy, c.tier) for c in export.completions] == [
        (cs[2].id, "answer 2", "policy-v1", 0),
        (cs[0].id, "answer 0", "policy-v1", 1),
        (cs[1].id, "answer 1", "policy-v1", 1),
    ]
    assert store.counts()["ranking_items"] == 3


def test_ranking_replay_returns_first_receipt_and_stores_nothing(store: Store) -> None:
    cs = _generate(store, n=3)
    first = store.add_ranking(_rank(cs, "same-key", [[0], [1], [2]]), cs[0].prompt_id)
    before = store.counts()
    replay = store.add_ranking(_rank(cs, "same-key", [[0], [1], [2]]), cs[0].prompt_id)
    different = Ranking(tiers=((cs[2].id, cs[1].id),), labeler="alice", idempotency_key="same-key")
    other = store.add_ranking(different, cs[0].prompt_id)
    expected = (first.ranking_id, first.prompt_id, first.pairs, True)
    for r in (replay, other):
        assert (r.ranking_id, r.prompt_id, r.pairs, r.duplicate) == expected
    # another labeler's reuse of the key is no replay of theirs: refused, nothing stored
    bobs = Ranking(tiers=((cs[2].id, cs[1].id),), labeler="bob", idempotency_key="same-key")
    with pytest.raises(Conflict, match="used by another labeler") as e:
        store.add_ranking(bobs, cs[0].prompt_id)
    assert e.value.field == "idempotency_key"
    assert store.counts() == before
    [export] = store.export_rankings(after=0, limit=10)
    assert export.labeler == "alice"
    assert [c.tier for c in export.completions] == [0, 1, 2]


def test_ranking_replay_after_a_lost_race_uses_the_unique_key(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    cs = _generate(store, n=2)
    first = store.add_ranking(_rank(cs, "raced", [[0], [1]]), cs[0].prompt_id)
    real = Store._ranking_by_key
    misses = iter([True])

    def miss_once(s: Session, key: str) -> RankingRow | None:
        # The first look-up sees no row, as if the winner had not yet committed.
        return None if next(misses, False) else real(s, key)

    monkeypatch.setattr(Store, "_ranking_by_key", staticmethod(miss_once))
    before = store.counts()
    replay = store.add_ranking(_rank(cs, "raced", [[1], [0]]), cs[0].prompt_id)
    assert (replay.ranking_id, replay.duplicate) == (first.ranking_id, True)
    assert store.counts() == before


def test_ranking_of_unknown_completion_is_refused_and_nothing_stored(store: Store) -> None:
    cs = _generate(store, n=2)
    before = store.counts()
    bad = Ranking(tiers=((cs[0].id,), ("cmp-nope",)), labeler="alice", idempotency_key="bad")
    with pytest.raises(InvalidRequest, match="bad"):
        store.add_ranking(bad, cs[0].prompt_id)
    assert store.counts() == before


def test_concurrent_rankings_with_one_key_store_exactly_one(store: Store) -> None:
    cs = _generate(store, n=3)
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    receipts = []
    errors: list[BaseException] = []

    def submit(i: int) -> None:
        ranking = _rank(cs, "racy", [[i % 3], [(i + 1) % 3]])
        barrier.wait()
        try:
            receipts.append(store.add_ranking(ranking, cs[0].prompt_id))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.ranking_id for r in receipts}) == 1
    assert sorted(r.duplicate for r in receipts) == [False] + [True] * (threads_n - 1)
    counts = store.counts()
    assert (counts["rankings"], counts["ranking_items"]) == (1, 2)


def test_export_pages_by_cursor(store: Store) -> None:
    cs = _generate(store, n=2)
    ids = [
        store.add_ranking(_rank(cs, f"k{i}", [[0], [1]]), cs[0].prompt_id).ranking_id
        for i in range(5)
    ]
    pages, after = [], 0
    while page := store.export_rankings(after=after, limit=2):
        pages.append([r.ranking_id for r in page])
        cursors = [r.cursor for r in page]
        assert cursors == sorted(cursors) and cursors[0] > after
        after = cursors[-1]
    assert pages == [ids[0:2], ids[2:4], ids[4:5]]
    assert store.export_rankings(after=after, limit=100) == []
    with pytest.raises(InvalidRequest, match="limit must be at least 1, got 0"):
        store.export_rankings(after=0, limit=0)


def test_prompt_export_pages_by_cursor(store: Store) -> None:
    prompt_ids = [_generate(store, n=1)[0].prompt_id for _ in range(3)]
    first = store.export_prompts(after=0, limit=2)
    rest = store.export_prompts(after=first[-1].cursor, limit=2)
    assert [p.prompt_id for p in first + rest] == prompt_ids


# --- durability ----------------------------------------------------------------------------


def test_sqlite_ranking_survives_close_and_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'flywheel.db'}"
    store = Store.open(url)
    with store._engine.connect() as conn:
        settings = [
            conn.exec_driver_sql(f"PRAGMA {p}").scalar()
            for p in ("journal_mode", "synchronous", "foreign_keys")
        ]
    assert settings == ["wal", 2, 1]  # synchronous=2 is FULL
    cs = _generate(store, n=2)
    receipt = store.add_ranking(_rank(cs, "durable", [[1], [0]]), cs[0].prompt_id)
    store.close()

    reopened = Store.open(url)
    try:
        [export] = reopened.export_rankings(after=0, limit=10)
        assert export.ranking_id == receipt.ranking_id
        assert [c.completion_id for c in export.completions] == [cs[1].id, cs[0].id]
    finally:
        reopened.close()


# --- demonstrations ------------------------------------------------------------------------


def test_demonstrations_are_idempotent(store: Store) -> None:
    first = store.add_demonstration(Demonstration("Q?", "A.", "alice", "demo-1"))
    assert first.demonstration_id.startswith("dem-") and not first.duplicate
    before = store.counts()
    replay = store.add_demonstration(Demonstration("Other?", "B.", "alice", "demo-1"))
    assert (replay.demonstration_id, replay.duplicate) == (first.demonstration_id, True)
    with pytest.raises(Conflict, match="used by another labeler"):
        store.add_demonstration(Demonstration("Other?", "B.", "bob", "demo-1"))
    assert store.counts() == before
    second = store.add_demonstration(Demonstration("Q2?", "A2.", "alice", "demo-2"))
    [d1] = store.export_demonstrations(after=0, limit=1)
    [d2] = store.export_demonstrations(after=d1.cursor, limit=1)
    assert (d1.demonstration_id, d1.prompt, d1.response, d1.labeler) == (
        first.demonstration_id,
        "Q?",
        "A.",
        "alice",
    )
    assert d2.demonstration_id == second.demonstration_id


# --- adapter versions ----------------------------------------------------------------------


def _add(store: Store, name: str = "policy", **metrics: float) -> int:
    version = store.add_adapter_version(
        name, sha256="ab" * 32, path=f"/adapters/{name}", base_model="tiny", metrics=metrics
    )
    return version.version


def test_adapter_versions_are_numbered_per_name(store: Store) -> None:
    assert [_add(store, "policy"), _add(store, "reward"), _add(store, "policy")] == [1, 1, 2]
    listed = [(v.name, v.version, v.state) for v in store.list_adapter_versions()]
    assert listed == [("policy", 1, "ready"), ("policy", 2, "ready"), ("reward", 1, "ready")]
    assert [v.id for v in store.list_adapter_versions("reward")] == ["reward-v1"]
    got = store.get_adapter_version("policy", 2)
    assert got is not None and (got.sha256, got.base_model) == ("ab" * 32, "tiny")
    assert store.get_adapter_version("policy", 3) is None
    assert store.counts()["adapter_versions"] == 3


def test_adapter_metrics_round_trip_and_are_checked(store: Store) -> None:
    _add(store, "reward", accuracy=0.75, kl=0.125)
    got = store.get_adapter_version("reward", 1)
    assert got is not None and got.metrics == {"accuracy": 0.75, "kl": 0.125}
    with pytest.raises(InvalidRequest, match="finite"):
        _add(store, "reward", kl=float("nan"))
    with pytest.raises(InvalidRequest, match="adapter name must be one of"):
        _add(store, "critic")


def test_concurrent_adapter_versions_get_distinct_numbers(store: Store) -> None:
    versions: list[int] = []
    threads = [threading.Thread(target=lambda: versions.append(_add(store))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]


def _states(store: Store, name: str = "policy") -> dict[int, str]:
    return {v.version: v.state for v in store.list_adapter_versions(name)}


def test_promote_and_rollback_script(store: Store) -> None:
    for _ in range(3):
        _add(store, "policy")
    _add(store, "reward")
    script = [
        ("promote", 1, {1: "live", 2: "ready", 3: "ready"}),
        ("promote", 2, {1: "retired", 2: "live", 3: "ready"}),
        ("promote", 2, {1: "retired", 2: "live", 3: "ready"}),  # already live: no-op
        ("promote", 3, {1: "retired", 2: "retired", 3: "live"}),
        ("rollback", 2, {1: "retired", 2: "live", 3: "retired"}),
        ("rollback", 1, {1: "live", 2: "retired", 3: "retired"}),
        ("rollback", None, {1: "retired", 2: "retired", 3: "retired"}),  # nothing live
        ("promote", 3, {1: "retired", 2: "retired", 3: "live"}),
        ("rollback", None, {1: "retired", 2: "retired", 3: "retired"}),
    ]
    for step, (action, version, expected) in enumerate(script):
        if action == "promote":
            assert version is not None
            result = store.promote("policy", version)
        elif version is None:
            assert store.rollback("policy") is None, f"step {step}"
        else:
            result = store.rollback("policy")
            assert result.version == version, f"step {step}"
        if version is not None:
            assert result.state == "live", f"step {step}"
        assert _states(store) == expected, f"step {step}: {action} {version}"
        live = store.live_version("policy")
        if version is None:
            assert live is None, f"step {step}"
        else:
            assert live is not None and expected[live.version] == "live", f"step {step}"
        assert _states(store, "reward") == {1: "ready"}, f"step {step}"
    assert store.live_version("reward") is None


def test_adapter_path_is_recorded_after_allocation(store: Store) -> None:
    store.add_adapter_version("policy", sha256="cd" * 32, path="", base_model="tiny", metrics={})
    moved = store.set_adapter_path("policy", 1, "/adapters/policy/v1")
    got = store.get_adapter_version("policy", 1)
    assert moved == got and got is not None and got.path == "/adapters/policy/v1"
    with pytest.raises(NotFound, match="policy-v2"):
        store.set_adapter_path("policy", 2, "/elsewhere")


def test_refused_version_cannot_be_promoted(store: Store) -> None:
    _add(store)
    refused = store.set_adapter_state("policy", 1, "refused")
    assert refused.state == "refused"
    with pytest.raises(Conflict, match="policy-v1 was refused"):
        store.promote("policy", 1)
    assert _states(store) == {1: "refused"}
    with pytest.raises(InvalidRequest, match="use promote"):
        store.set_adapter_state("policy", 1, "live")


def test_unknown_versions_are_not_found(store: Store) -> None:
    _add(store)
    with pytest.raises(
        NotFound, match="no adapter version policy-v7; known versions of policy: \\[1\\]"
    ):
        store.promote("policy", 7)
    with pytest.raises(NotFound, match="policy-v7"):
        store.set_adapter_state("policy", 7, "retired")
    assert _states(store) == {1: "ready"}


def test_rollback_without_history_is_a_conflict(store: Store) -> None:
    with pytest.raises(Conflict, match="no promoted version of policy to roll back"):
        store.rollback("policy")
    _add(store)
    store.promote("policy", 1)
    with pytest.raises(Conflict, match="no earlier live version of policy"):
        store.rollback("policy", allow_empty=False)
    assert _states(store) == {1: "live"}
    assert store.rollback("policy") is None  # back to no live version
    assert _states(store) == {1: "retired"}
    with pytest.raises(Conflict, match="no promoted version of policy to roll back"):
        store.rollback("policy")


# --- champion / challenger -------------------------------------------------------------------


def _challenge_comparison(store: Store, seq: int | None, policies: list[str]) -> list[str]:
    """A stored comparison (its prompt marked as challenge `seq`'s); the completion ids."""
    prompt = PromptRecord(id=f"prm-{uuid.uuid4().hex}", text="q", kind="text", challenge=seq)
    completions = [
        CompletionRecord(
            id=f"cmp-{uuid.uuid4().hex}",
            prompt_id=prompt.id,
            index=i,
            text=f"answer {i}",
            finish_reason="stop",
            policy=policy,
            sampling=Sampling(),
            prompt_tokens=1,
            completion_tokens=2,
        )
        for i, policy in enumerate(policies)
    ]
    store.record_generation(prompt, completions)
    return [c.id for c in completions]


def test_a_challenge_names_the_live_champion_and_only_one_runs(store: Store) -> None:
    for _ in range(3):
        _add(store)
    first = store.start_challenge(2)  # nothing live: the base model is the champion
    assert (first.challenger, first.champion, first.outcome, first.ended_at) == (
        2,
        0,
        "running",
        None,
    )
    store.promote("policy", 1)  # the live policy moved: that challenge is over
    assert store.running_challenge() is None
    assert store.latest_challenge() == replace(
        first, outcome="stopped", ended_at=store.latest_challenge().ended_at
    )
    second = store.start_challenge(2)
    assert second.champion == 1
    third = store.start_challenge(3)  # replaces the running one
    assert store.running_challenge() == third
    with Session(store._engine) as s:
        outcomes = s.execute(text("SELECT seq, outcome FROM challenges ORDER BY seq")).all()
    assert [o for _, o in outcomes] == ["stopped", "stopped", "running"]
    assert _states(store) == {1: "live", 2: "ready", 3: "ready"}


@pytest.mark.parametrize(("state", "why"), [("live", "policy-v1 is live"), ("refused", "refused")])
def test_only_a_ready_version_can_challenge(store: Store, state: str, why: str) -> None:
    _add(store)
    if state == "live":
        store.promote("policy", 1)
    else:
        store.set_adapter_state("policy", 1, state)
    with pytest.raises(Conflict, match=why):
        store.start_challenge(1)
    with pytest.raises(NotFound, match="policy-v9"):
        store.start_challenge(9)
    assert store.latest_challenge() is None


def test_challenge_rankings_are_those_of_its_blind_comparisons(store: Store) -> None:
    _add(store), _add(store)
    store.promote("policy", 1)
    c = store.start_challenge(2)
    mixed = _challenge_comparison(store, c.seq, ["policy-v2", "policy-v1", "policy-v2"])
    store.add_ranking(
        Ranking(((mixed[1],), (mixed[0], mixed[2])), "ann", "k1"), _prompt_of(store, mixed)
    )
    # Not part of the challenge: a comparison with explicit policies, though of the same two.
    open_ = _challenge_comparison(store, None, ["policy-v2", "policy-v1"])
    store.add_ranking(Ranking(((open_[0],), (open_[1],)), "ann", "k2"), _prompt_of(store, open_))
    assert store.challenge_rankings(c) == [(("policy-v1", 0), ("policy-v2", 1), ("policy-v2", 1))]


def _prompt_of(store: Store, ids: list[str]) -> str:
    return store.get_completions(ids)[ids[0]].prompt_id


def test_a_promoted_challenger_goes_live_with_history(store: Store) -> None:
    _add(store), _add(store)
    store.promote("policy", 1)
    c = store.start_challenge(2)
    ended = store.end_challenge(c.seq, "promoted")
    assert ended is not None and (ended.outcome, ended.ended_at is not None) == ("promoted", True)
    assert _states(store) == {1: "retired", 2: "live"}
    assert store.end_challenge(c.seq, "retired") is None  # decided once
    assert _states(store) == {1: "retired", 2: "live"}
    assert store.rollback("policy").version == 1  # an ordinary promotion: it can be rolled back


def test_a_retired_challenger_leaves_the_champion_live(store: Store) -> None:
    _add(store), _add(store)
    store.promote("policy", 1)
    c = store.start_challenge(2)
    assert store.end_challenge(c.seq, "retired").outcome == "retired"
    assert _states(store) == {1: "live", 2: "retired"}
    assert store.running_challenge() is None
    with pytest.raises(InvalidRequest, match="outcome must be one of"):
        store.end_challenge(c.seq, "running")


def test_an_ended_challenge_keeps_its_final_tally(store: Store) -> None:
    _add(store)
    c = store.start_challenge(1)
    before = _challenge_comparison(store, c.seq, ["policy-v1", "policy-v0"])
    store.add_ranking(Ranking(((before[0],), (before[1],)), "ann", "k1"), _prompt_of(store, before))
    late = _challenge_comparison(store, c.seq, ["policy-v1", "policy-v0"])
    ended = store.end_challenge(c.seq, "stopped")
    assert ended is not None
    store.add_ranking(Ranking(((late[1],), (late[0],)), "ann", "k2"), _prompt_of(store, late))
    assert store.challenge_rankings(ended) == [(("policy-v1", 0), ("policy-v0", 1))]


def test_promoting_the_challenger_by_hand_ends_its_challenge_promoted(store: Store) -> None:
    _add(store), _add(store)
    c = store.start_challenge(2)
    store.promote("policy", 2)
    assert store.latest_challenge().outcome == "promoted"
    c = store.start_challenge(1)
    assert c.champion == 2
    store.rollback("policy")  # back to the base model: not the champion any more
    assert store.latest_challenge().outcome == "stopped"


# --- migrations ----------------------------------------------------------------------------


def test_migrated_schema_matches_metadata(store: Store) -> None:
    with store._engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        head = MigrationContext.configure(conn).get_current_revision()
    assert diff == []
    assert head == "0004"


def test_open_is_idempotent(db_url: str) -> None:
    Store.open(db_url).close()
    again = Store.open(db_url)
    try:
        assert set(again.counts().values()) == {0}
    finally:
        again.close()


def test_the_audit_trail_appends_and_pages(store: Store) -> None:
    store.add_audit([AuditEntry("ops", "promote", "policy-v2", "was policy-v1", at=5.0)])
    store.add_audit([AuditEntry("x" * 300, "key_rejected", "RateLimited", "7 requests")])
    first, second = store.export_audit(after=0, limit=10)
    assert (first.actor, first.action, first.target, first.detail, first.at) == (
        "ops", "promote", "policy-v2", "was policy-v1", 5.0
    )  # fmt: skip
    assert second.cursor > first.cursor and len(second.actor) == 256 and second.at > 5.0
    assert store.export_audit(after=first.cursor, limit=10) == [second]
    with pytest.raises(InvalidRequest):
        store.export_audit(after=-1, limit=10)
