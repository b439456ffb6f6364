"""Scripted labelers: preferences, ranking construction, and a labeler against a fake client."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from flywheel_cli import main as cli
from flywheel_cli.labelers import (
    Contains,
    Correct,
    Incorrect,
    Labeler,
    Longer,
    Shorter,
    demo_prompts,
    idempotency_key,
    preference_from_spec,
    prompt_text,
    tiers_by_key,
)
from flywheel_client.errors import Conflict, InvalidArgument, NotFound, Overloaded
from flywheel_client.ranking import as_tiers
from flywheel_client.types import Comparison, Completion, RankingReceipt

pytestmark = pytest.mark.unit

# -- preferences ---------------------------------------------------------------------------------


def test_correct_scores_the_demo_answer() -> None:
    correct = Correct()
    assert correct.key("add: 2 + 3", "5") == 1.0
    assert correct.key("add: 2 + 3", " 5 ") == 1.0  # the checker strips whitespace
    assert correct.key("add: 2 + 3", "6") == 0.0
    assert correct.key("reverse: abc", "cba") > correct.key("reverse: abc", "abc")


def test_incorrect_is_the_opposite_of_correct() -> None:
    assert Incorrect().key("add: 2 + 3", "6") == 1.0
    assert Incorrect().key("add: 2 + 3", "5") == 0.0
    with pytest.raises(ValueError, match="needs a demo-task instruction"):
        Incorrect().key("tell me a joke", "no")


def test_correct_refuses_a_prompt_with_no_demo_instruction() -> None:
    with pytest.raises(ValueError, match="needs a demo-task instruction"):
        Correct().key("tell me a joke", "no")


def test_length_and_contains_preferences() -> None:
    assert Shorter().key("p", "ab") > Shorter().key("p", "abc")
    assert Longer().key("p", "abc") > Longer().key("p", "ab")
    yes = Contains("yes")
    assert yes.key("p", "oh yes!") == 1.0
    assert yes.key("p", "no") == 0.0
    assert yes.key("p", "YES") == 0.0  # case-sensitive substring


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("correct", Correct()),
        ("incorrect", Incorrect()),
        ("shorter", Shorter()),
        (" Longer ", Longer()),
        ("contains:yes", Contains("yes")),
        ("contains:a:b", Contains("a:b")),
    ],
)
def test_preference_from_spec(spec: str, expected: object) -> None:
    preference = preference_from_spec(spec)
    assert preference == expected
    assert preference_from_spec(str(preference)) == expected  # str() is the spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kindest", "unknown preference 'kindest'; choose one of correct, incorrect, shorter"),
        ("", "unknown preference"),
        ("contains", "contains needs a word"),
        ("contains:", "contains needs a word"),
        ("shorter:3", "takes no argument"),
    ],
)
def test_preference_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preference_from_spec(spec)


# -- rankings ------------------------------------------------------------------------------------


def test_tiers_by_key_orders_best_first_and_ties_share_a_tier() -> None:
    assert tiers_by_key(["a", "b", "c", "d"], [0.0, 2.0, 0.0, 1.0]) == (("b",), ("d",), ("a", "c"))
    assert tiers_by_key(["a", "b"], [1.0, 1.0]) == (("a", "b"),)
    with pytest.raises(ValueError, match="2 ids but 1 keys"):
        tiers_by_key(["a", "b"], [1.0])


def test_prompt_text_of_a_chat_is_its_last_user_message() -> None:
    assert prompt_text("add: 1 + 1") == "add: 1 + 1"
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "reverse: abc"},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "sort: cab"},
    ]
    assert prompt_text(chat) == "sort: cab"


def test_demo_prompts_are_seeded_user_chats() -> None:
    first = list(itertools.islice(demo_prompts(seed=3), 5))
    assert first == list(itertools.islice(demo_prompts(seed=3), 5))
    for messages in first:
        [message] = messages
        assert message["role"] == "user"
        assert Correct().key(message["content"], "?") == 0.0  # a demo instruction: no error
    adds = itertools.islice(demo_prompts(seed=0, task="add"), 3)
    assert all(m[0]["content"].startswith("add: ") for m in adds)


# -- a labeler against a fake client -------------------------------------------------------------


class FakeClient:
    """Serves scripted candidate texts; records what the labeler asks and submits."""

    def __init__(self, texts: Sequence[str], failures: Sequence[Exception] = ()) -> None:
        self.texts = list(texts)
        self.failures = list(failures)  # raised by rank, one per call, before succeeding
        self.compares: list[dict[str, Any]] = []
        self.ranks: list[dict[str, Any]] = []
        self.keys_seen: set[str] = set()
        self._prompts = itertools.count(1)

    def compare(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        k: int = 4,
        policies: Sequence[str] = (),
        **sampling: Any,
    ) -> Comparison:
        self.compares.append(
            {"prompt": prompt, "messages": messages, "k": k, "policies": policies, **sampling}
        )
        pid = f"prm-{next(self._prompts)}"
        candidates = tuple(
            Completion(
                id=f"{pid}-c{i}",
                index=i,
                text=self.texts[i],
                finish_reason="stop",
                policy="policy-v0",
            )
            for i in range(k)
        )
        return Comparison(prompt_id=pid, candidates=candidates)

    def rank(
        self, ranking: Any, *, labeler: str, idempotency_key: str | None = None
    ) -> RankingReceipt:
        self.ranks.append({"tiers": as_tiers(ranking), "labeler": labeler, "key": idempotency_key})
        if self.failures:
            raise self.failures.pop(0)
        assert idempotency_key is not None
        duplicate = idempotency_key in self.keys_seen
        self.keys_seen.add(idempotency_key)
        tiers = as_tiers(ranking)
        sizes = [len(t) for t in tiers]
        pairs = sum(a * b for i, a in enumerate(sizes) for b in sizes[i + 1 :])
        prompt_id = tiers[0][0].rsplit("-", 1)[0]
        return RankingReceipt(f"rnk-{len(self.ranks)}", prompt_id, pairs, duplicate)


class Clock:
    """A fake monotonic clock that advances `step` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step
        self.slept: list[float] = []

    def __call__(self) -> float:
        self.now += self.step
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_label_once_submits_the_preferred_order() -> None:
    client = FakeClient(["5", "6", "05", "5 "])
    labeler = Labeler(
        client, Correct(), name="sim", k=4, temperature=0.5, max_tokens=6, policies=["policy-v1"]
    )
    result = labeler.label_once([{"role": "user", "content": "add: 2 + 3"}])
    assert client.compares == [
        {
            "prompt": None,
            "messages": [{"role": "user", "content": "add: 2 + 3"}],
            "k": 4,
            "policies": ("policy-v1",),
            "temperature": 0.5,
            "max_tokens": 6,
        }
    ]
    assert result.keys == (1.0, 0.0, 0.0, 1.0)
    expected = (("prm-1-c0", "prm-1-c3"), ("prm-1-c1", "prm-1-c2"))
    assert result.tiers == expected
    assert client.ranks == [{"tiers": expected, "labeler": "sim", "key": "sim:prm-1"}]
    assert result.receipt is not None and result.receipt.pairs == 4
    assert not result.skipped


def test_a_text_prompt_is_sent_as_text() -> None:
    client = FakeClient(["aa", "a"])
    Labeler(client, Longer(), name="sim", k=2).label_once("anything")
    assert client.compares[0]["prompt"] == "anything"
    assert client.compares[0]["messages"] is None
    assert client.ranks[0]["tiers"] == (("prm-1-c0",), ("prm-1-c1",))


def test_all_tied_candidates_are_skipped_not_submitted() -> None:
    client = FakeClient(["same", "same", "same"])
    labeler = Labeler(client, Longer(), name="sim", k=3)
    result = labeler.label_once("p")
    assert result.skipped and result.receipt is None
    assert result.tiers == (("prm-1-c0", "prm-1-c1", "prm-1-c2"),)
    assert client.ranks == []
    stats = labeler.run(itertools.repeat("p"), count=3)
    assert (stats.submitted, stats.skipped, stats.errors) == (0, 3, 0)


def test_idempotency_key_is_deterministic_and_reused_on_retry() -> None:
    assert idempotency_key("sim", "prm-7") == idempotency_key("sim", "prm-7") == "sim:prm-7"
    clock = Clock(step=0.0)
    client = FakeClient(["long", "s"], failures=[Overloaded("busy"), Overloaded("busy")])
    labeler = Labeler(
        client, Longer(), name="sim", k=2, backoff=0.1, sleep=clock.sleep, clock=clock
    )
    stats = labeler.run(["p"], count=1)
    assert [r["key"] for r in client.ranks] == ["sim:prm-1"] * 3  # same key every attempt
    assert clock.slept == [0.1, 0.2]  # exponential backoff
    assert (stats.submitted, stats.retries, stats.errors) == (1, 2, 0)


def test_a_retry_waits_the_servers_retry_after_when_longer() -> None:
    clock = Clock(step=0.0)
    busy = [Overloaded("over limit", retry_after=3.0), Overloaded("busy", retry_after=0.01)]
    client = FakeClient(["long", "s"], failures=busy)
    labeler = Labeler(
        client, Longer(), name="sim", k=2, backoff=0.1, sleep=clock.sleep, clock=clock
    )
    assert labeler.run(["p"], count=1).submitted == 1
    assert clock.slept == [3.0, 0.2]


def test_overloaded_past_the_retry_budget_counts_as_an_error() -> None:
    clock = Clock(step=0.0)
    client = FakeClient(["long", "s"], failures=[Overloaded("busy")] * 3)
    labeler = Labeler(client, Longer(), name="sim", k=2, retries=2, sleep=clock.sleep, clock=clock)
    stats = labeler.run(itertools.repeat("p"), count=2)
    assert (stats.submitted, stats.errors, stats.retries) == (1, 1, 2)
    assert stats.last_error == "busy"


def test_run_respects_count() -> None:
    client = FakeClient(["aa", "a", "aaa", "aaaa"])
    seen: list[int] = []
    labeler = Labeler(client, Longer(), name="sim")
    stats = labeler.run(itertools.repeat("p"), count=5, on_result=lambda s: seen.append(s.attempts))
    assert stats.submitted == 5 == len(client.compares)
    assert stats.pairs == 5 * 6
    assert seen == [1, 2, 3, 4, 5]
    assert Labeler(client, Longer(), name="sim").run(iter(["p"]), count=10).attempts == 1


def test_run_respects_seconds() -> None:
    clock = Clock(step=1.0)  # every clock read advances a second
    client = FakeClient(["aa", "a"])
    labeler = Labeler(client, Longer(), name="sim", k=2, clock=clock, sleep=clock.sleep)
    stats = labeler.run(itertools.repeat("p"), seconds=4.5)
    # start=1; each attempt reads the clock twice (check + stats), so checks at 2, 4, 6.
    assert stats.attempts == 2
    assert len(client.compares) == 2


def test_run_must_be_bounded_and_arguments_are_checked() -> None:
    labeler = Labeler(FakeClient(["a", "b"]), Longer(), name="sim", k=2)
    with pytest.raises(ValueError, match="never runs unbounded"):
        labeler.run(itertools.repeat("p"))
    with pytest.raises(ValueError, match="k must be at least 2"):
        Labeler(FakeClient([]), Longer(), name="sim", k=1)


def test_consecutive_errors_end_the_run() -> None:
    client = FakeClient(["aa", "a"], failures=[NotFound("gone")] * 10)
    labeler = Labeler(client, Longer(), name="sim", k=2, max_consecutive_errors=3)
    with pytest.raises(NotFound, match="gone"):
        labeler.run(itertools.repeat("p"), count=100)
    assert len(client.ranks) == 3


def test_an_error_between_successes_is_counted_and_the_run_goes_on() -> None:
    client = FakeClient(["aa", "a"], failures=[Conflict("not now")])
    stats = Labeler(client, Longer(), name="sim", k=2).run(itertools.repeat("p"), count=3)
    assert (stats.submitted, stats.errors, stats.last_error) == (2, 1, "not now")


def test_an_invalid_argument_ends_the_run_at_once() -> None:
    client = FakeClient(["aa", "a"], failures=[InvalidArgument("max_tokens must be ...")])
    with pytest.raises(InvalidArgument, match="max_tokens"):
        Labeler(client, Longer(), name="sim", k=2).run(itertools.repeat("p"), count=100)
    assert len(client.ranks) == 1


def test_a_preference_error_propagates_at_once() -> None:
    labeler = Labeler(FakeClient(["a", "b"]), Correct(), name="sim", k=2)
    with pytest.raises(ValueError, match="demo-task instruction"):
        labeler.run(itertools.repeat("hello"), count=5)


# -- the command line ----------------------------------------------------------------------------


def test_simulate_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["simulate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--preference", "--k", "--count", "--seconds", "--labeler", "--seed", "--json"]:
        assert flag in out
    assert "contains:WORD" in out and "scripted labeler" in out


def test_simulate_rejects_an_unknown_preference(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--preference", "kind"]) == cli.EXIT_USAGE
    assert "unknown preference 'kind'" in capsys.readouterr().err


def test_simulate_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["simulate", "--server", "127.0.0.1:1", "--preference", "longer", "--timeout", "2"]
    )
    assert code == cli.EXIT_SERVER_ERROR
    assert "cannot reach the server at 127.0.0.1:1" in capsys.readouterr().err


def test_labelers_import_without_torch() -> None:
    code = (
        "import sys, itertools\n"
        "from flywheel_cli.labelers import demo_prompts, preference_from_spec\n"
        "m = next(demo_prompts(0))[0]['content']\n"
        "preference_from_spec('correct').key(m, 'x')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
