"""The labeling queue in the store, on SQLite and PostgreSQL: one task per prompt, reservations
that expire, shared tasks for two labelers, skips, and a ranking that completes a claim."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from flywheel_server.domain import CompletionRecord, PromptRecord, Ranking, Sampling
from flywheel_server.errors import NotFound
from flywheel_server.store import Store
from flywheel_server.store.tasks import new_task
from tests.unit import test_store

pytestmark = pytest.mark.unit

db_url = test_store.db_url
HOLD = 60.0


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


def comparison(store: Store, text: str = "a prompt") -> tuple[str, list[str]]:
    """A stored prompt with two completions, as comparison sampling leaves it."""
    prompt = PromptRecord(f"prm-{uuid.uuid4().hex}", text, "text")
    ids = [f"cmp-{uuid.uuid4().hex}" for _ in range(2)]
    completions = [
        CompletionRecord(cid, prompt.id, i, f"answer {i}", "stop", "policy-v0", Sampling(), 2, 2)
        for i, cid in enumerate(ids)
    ]
    store.record_generation(prompt, completions)
    return prompt.id, [c.id for c in completions]


def test_one_task_per_distinct_prompt(store: Store) -> None:
    tasks = [new_task(t, "chat", "file", 1) for t in ("a", "b", "a")]
    assert [t.text for t in store.add_tasks(tasks)] == ["a", "b"]
    assert store.add_tasks([new_task("b", "chat", "typed", 1)]) == []
    assert [t.text for t in store.add_tasks([new_task("b", "text", "traffic", 1)])] == ["b"]


def test_a_claim_is_kept_until_it_expires_then_offered_again(store: Store) -> None:
    store.add_tasks([new_task("first", "chat", "file", 1), new_task("second", "chat", "file", 1)])
    mine = store.claim_task("ann", at=0.0, hold_s=HOLD)
    assert mine is not None and mine.task.text == "first" and mine.reserved_until == HOLD
    assert store.claim_task("ann", at=10.0, hold_s=HOLD) == mine  # a reload shows the same
    other = store.claim_task("bob", at=10.0, hold_s=HOLD)
    assert other is not None and other.task.text == "second"  # ann holds the first
    assert store.claim_task("cid", at=10.0, hold_s=HOLD) is None
    late = store.claim_task("cid", at=HOLD + 1, hold_s=HOLD)  # ann's reservation lapsed
    assert late is not None and late.task.text == "first"


def test_a_shared_task_goes_to_two_labelers_and_a_ranking_completes_a_claim(
    store: Store,
) -> None:
    (task,) = store.add_tasks([new_task("shared", "chat", "file", 2)])
    ann = store.claim_task("ann", at=0.0, hold_s=HOLD)
    bob = store.claim_task("bob", at=0.0, hold_s=HOLD)
    assert ann is not None and bob is not None and ann.task == bob.task == task
    assert store.claim_task("cid", at=0.0, hold_s=HOLD) is None  # two copies are held
    prompt_id, ids = comparison(store)
    other, _ = comparison(store)
    assert store.set_claim_prompt(task.id, "ann", prompt_id) == prompt_id
    assert store.set_claim_prompt(task.id, "bob", other) == prompt_id  # ann's was first
    store.add_ranking(Ranking([[ids[1]], [ids[0]]], "ann", "k1"), prompt_id)
    assert store.claim_task("ann", at=1.0, hold_s=HOLD) is None  # ranked: not offered again
    late = store.claim_task("cid", at=HOLD + 1, hold_s=HOLD)  # bob's lapsed
    assert late is not None and late.prompt_id == prompt_id  # the task's one comparison
    assert store.ranked_since("ann", 0.0) == 1 and store.ranked_since("bob", 0.0) == 0


def test_a_ranking_by_someone_else_leaves_the_claim_reserved(store: Store) -> None:
    (task,) = store.add_tasks([new_task("t", "chat", "file", 1)])
    assert store.claim_task("ann", at=0.0, hold_s=HOLD) is not None
    prompt_id, ids = comparison(store)
    store.set_claim_prompt(task.id, "ann", prompt_id)
    store.add_ranking(Ranking([[ids[0]], [ids[1]]], "bob", "k1"), prompt_id)
    again = store.claim_task("ann", at=1.0, hold_s=HOLD)
    assert again is not None and again.state == "reserved" and again.prompt_id == prompt_id


def test_a_skipped_task_is_not_offered_to_that_labeler_again(store: Store) -> None:
    (task,) = store.add_tasks([new_task("t", "chat", "file", 1)])
    assert store.claim_task("ann", at=0.0, hold_s=HOLD) is not None
    assert store.skip_task(task.id, "ann", at=1.0).state == "skipped"
    assert store.claim_task("ann", at=2.0, hold_s=HOLD) is None
    assert store.claim_task("bob", at=2.0, hold_s=HOLD) is not None  # a skip frees the task
    assert store.skip_task(task.id, "bob", at=3.0, all_bad=True).state == "all_bad"
    with pytest.raises(NotFound, match="holds no task"):
        store.skip_task(task.id, "cid", at=3.0)


def test_labelers_asking_at_once_never_share_a_single_copy_task(store: Store) -> None:
    store.add_tasks([new_task(f"t{i}", "chat", "file", 1) for i in range(4)])
    claims: list[str] = []

    def take(labeler: str) -> None:
        claim = store.claim_task(labeler, at=0.0, hold_s=HOLD)
        if claim is not None:
            claims.append(claim.task.id)

    threads = [threading.Thread(target=take, args=(f"l{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claims) == len(set(claims)) == 4


def test_traffic_refills_with_distinct_prompts_that_were_not_labeling_comparisons(
    store: Store,
) -> None:
    comparison(store, "asked twice")
    comparison(store, "asked twice")
    comparison(store, "asked once")
    (task,) = store.add_tasks([new_task("labeling", "chat", "file", 1)])
    store.claim_task("ann", at=0.0, hold_s=HOLD)
    shown, _ = comparison(store, "<|user|>labeling")
    store.set_claim_prompt(task.id, "ann", shown)
    assert sorted(store.traffic_prompts()) == [("text", "asked once"), ("text", "asked twice")]
    store.add_tasks([new_task("asked once", "text", "traffic", 1)])
    assert store.traffic_prompts() == [("text", "asked twice")]
