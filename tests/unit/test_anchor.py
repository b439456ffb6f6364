"""The human anchor: the labelers' rankings as the verdict on two policies' greedy answers."""

from __future__ import annotations

import pytest

from flywheel_learner.anchor import RankedPrompts, Verdicts, newest_prompts
from flywheel_learner.gate import EvalMetrics, GateThresholds, gate

pytestmark = pytest.mark.unit

RANKINGS = [
    ("reverse: pbc", [["cbp"], ["cbc", "pbc"], ["x"]]),
    ("add: 1 + 2", [[" 3 "], ["4"]]),
    ("add: 1 + 2", [["4"], ["3"]]),  # a second labeler disagrees: level
    ("sort: 31", [["13"], ["31"]]),
]


def test_a_ranking_holding_both_answers_is_the_verdict() -> None:
    ranked = RankedPrompts(RANKINGS)
    assert ranked.verdict("reverse: pbc", "cbp", "cbc") == 1
    assert ranked.verdict("reverse: pbc", "cbc ", "cbp") == -1  # whitespace aside
    assert ranked.verdict("reverse: pbc", "cbc", "pbc") == 0  # one tier
    assert ranked.verdict("add: 1 + 2", "3", "4") == 0  # one vote each way
    assert ranked.verdict("reverse: pbc", "cbp", "bcp") is None  # nobody ranked "bcp"
    assert ranked.verdict("never ranked", "a", "b") is None


def test_compare_counts_only_changed_and_ranked_answers() -> None:
    ranked = RankedPrompts(RANKINGS)
    prompts = ["reverse: pbc", "sort: 31", "add: 1 + 2", "reverse: pbc", "sort: 31"]
    ours = ["cbc", "13", "3", "zzz", "31"]
    theirs = ["cbp", "31", "4", "cbp", "31 "]  # the last is unchanged: not counted
    verdicts = ranked.compare(prompts, ours, theirs)
    assert verdicts == Verdicts(wins=1, losses=1, ties=1) and verdicts.decisive == 2


def test_newest_prompts_are_distinct_and_newest_first() -> None:
    assert newest_prompts(RANKINGS, 2) == ["sort: 31", "add: 1 + 2"]
    assert newest_prompts(RANKINGS, 10) == ["sort: 31", "add: 1 + 2", "reverse: pbc"]
    assert newest_prompts([], 10) == []


def metrics(human: Verdicts) -> EvalMetrics:
    """A candidate both models favour (reward gain 0.5, judge gain 0.3)."""
    return EvalMetrics(1.5, 1.0, 1.5, 1.0, 1.0, 2.0, 2.0, 0.3, human)


def test_the_gate_refuses_what_the_models_favour_but_the_labelers_rankings_do_not() -> None:
    passed, reasons = gate(metrics(Verdicts(7, 25, 4)), GateThresholds())
    assert not passed and reasons == [
        "the labelers' rankings do not prefer its greedy answers: on the held-out ranked "
        "prompts where the two policies answer differently and a ranking holds both, the "
        "candidate's ranked above the live policy's 7 times, below 25 (level 4)"
    ]
    assert gate(metrics(Verdicts(20, 10, 0)), GateThresholds()) == (True, [])
    assert not gate(metrics(Verdicts(5, 5, 1)), GateThresholds())[0]  # level is not enough
    assert gate(metrics(Verdicts(0, 0, 9)), GateThresholds())[0]  # all level: nothing decided
    assert gate(metrics(Verdicts(0, 2, 0)), GateThresholds())[0]  # too few to judge by
    assert not gate(metrics(Verdicts(0, 2, 0)), GateThresholds(min_human_verdicts=2))[0]
    with pytest.raises(ValueError, match="min_human_verdicts must be >= 1"):
        GateThresholds(min_human_verdicts=0)
