"""The dashboard's arithmetic: agreement between labelers, and Bradley-Terry ratings."""

from __future__ import annotations

import math
import random

import pytest

from flywheel_server import stats_math as sm

pytestmark = pytest.mark.unit


def test_pair_agreement_counts_ties_against_orders_as_disagreements() -> None:
    assert sm.pair_agreement([["a"], ["b"], ["c"]], [["a"], ["b"], ["c"]]) == (3, 3)
    assert sm.pair_agreement([["a"], ["b"], ["c"]], [["c"], ["b"], ["a"]]) == (0, 3)
    # a=b tied by the second: that pair disagrees; (a, c) and (b, c) agree
    assert sm.pair_agreement([["a"], ["b"], ["c"]], [["a", "b"], ["c"]]) == (2, 3)
    assert sm.pair_agreement([["a", "b"]], [["b", "a"]]) == (0, 0)  # both tie: nothing to compare
    assert sm.pair_agreement([["a"], ["b"]], [["x"], ["b"]]) == (0, 0)  # one item in common


def test_agreement_per_labeler_and_overall() -> None:
    shared = {
        "p1": {"ann": [["a"], ["b"]], "bob": [["a"], ["b"]]},
        "p2": {"ann": [["c"], ["d"]], "bob": [["d"], ["c"]], "cid": [["d"], ["c"]]},
    }
    result = sm.agreement(shared)
    # p1: ann-bob agree (1/1); p2: ann-bob 0/1, ann-cid 0/1, bob-cid 1/1
    assert (result.pairs, result.rate) == (4, 0.5)
    assert result.by_labeler == {"ann": (3, 1 / 3), "bob": (3, 2 / 3), "cid": (2, 0.5)}
    assert math.isnan(sm.agreement({}).rate)


def test_wins_count_only_pairs_of_different_players_in_different_tiers() -> None:
    policy = {"a": "v1", "b": "v2", "c": "v2", "d": "v1"}
    games = sm.wins([([["a"], ["b", "c"], ["d"]], policy)])
    # a>b, a>c: v1 beats v2 twice; b>d, c>d: v2 beats v1 twice; a>d, b=c: same player / tie
    assert games == {("v1", "v2"): 2, ("v2", "v1"): 2}


def test_bradley_terry_recovers_the_two_player_odds() -> None:
    ratings = sm.bradley_terry({("A", "B"): 3, ("B", "A"): 1}, prior=0.5)
    # 3.5 of 5 games with the prior: A / (A + B) = 0.7
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(7 / 3), abs=0.5)
    assert ratings["A"] + ratings["B"] == pytest.approx(0, abs=1e-6)


def test_ratings_order_players_by_strength_with_intervals_that_hold_them() -> None:
    rng = random.Random(0)
    truth = {"v1": 0.0, "v2": 200.0, "v3": 400.0}
    games: dict[tuple[str, str], int] = {}
    for a in truth:
        for b in truth:
            if a < b:
                p = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
                for _ in range(150):
                    pair = (a, b) if rng.random() < p else (b, a)
                    games[pair] = games.get(pair, 0) + 1
    ratings = sm.rate_players(games, samples=100)
    assert [r.player for r in ratings] == ["v3", "v2", "v1"]
    centred = {p: v - sum(truth.values()) / 3 for p, v in truth.items()}
    for r in ratings:
        assert r.low <= r.rating <= r.high
        assert r.low - 30 <= centred[r.player] <= r.high + 30
        assert r.games == 300


def test_agreement_with_the_reward_model_orders_candidates_by_score() -> None:
    import asyncio

    from flywheel_server import stats
    from flywheel_server.domain import RankedCompletion, RankingExport

    def ranking(labeler: str, tiers: list[list[str]]) -> RankingExport:
        completions = tuple(
            RankedCompletion(completion_id=c, text=c, policy="policy-v0", tier=t)
            for t, tier in enumerate(tiers)
            for c in tier
        )
        return RankingExport(0, f"rnk-{labeler}", "prm", "prompt", completions, labeler, 0.0)

    scores = {"a": 3.0, "b": 2.0, "c": 2.0}  # the model ties b and c

    async def score(prompt: str, texts: list[str]) -> list[float]:
        return [scores[t] for t in texts]

    figures = asyncio.run(stats.reward_agreement(
        [ranking("ann", [["a"], ["b"], ["c"]]), ranking("bob", [["c"], ["b", "a"]])], score
    ))  # fmt: skip
    by = {x["labeler"]: (x["pairs"], x["rate"]) for x in figures["labelers"]}
    # ann: a>b, a>c agree, b>c against the model's tie: 2 of 3; bob: c>a, c>b, b=a: 0 of 3
    assert by == {"ann": (3, 2 / 3), "bob": (3, 0.0)}
    assert (figures["pairs"], figures["rate"]) == (6, 1 / 3)


def test_a_policy_version_carries_the_gate_thresholds_it_was_judged_by() -> None:
    from flywheel_learner.gate import GateThresholds

    published = GateThresholds(max_kl=7.5).as_metrics()
    assert published["gate_max_kl"] == 7.5 and published["gate_min_reward_gain"] == 0.0
    assert set(published) == {"gate_min_reward_gain", "gate_min_greedy_reward_gain",
                              "gate_max_kl", "gate_max_ptx_rise", "gate_min_judge_gain",
                              "gate_min_human_verdicts"}  # fmt: skip
