"""The champion / challenger math: ranking scores, the Wilson interval, the tally, the decision."""

from __future__ import annotations

import random

import pytest

from flywheel_server.challenge import (
    Tally,
    Thresholds,
    challenger_seats,
    decide,
    ranking_score,
    scores,
    tally,
    wilson_interval,
)

pytestmark = pytest.mark.unit

NEW, OLD = "policy-v2", "policy-v1"


# -- one ranking -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranked", "score"),
    [
        ([(NEW, 0), (OLD, 1)], 1.0),
        ([(OLD, 0), (NEW, 1)], 0.0),
        ([(NEW, 0), (OLD, 0)], 0.5),  # tied: half a win
        # Every cross pair: (0 vs 1) win, (0 vs 1) win, (2 vs 1) loss, (2 vs 1) loss.
        ([(NEW, 0), (OLD, 1), (OLD, 1), (NEW, 2)], 0.5),
        # (0 vs 1) win, (1 vs 1) tie: (1 + 1/2) / 2.
        ([(NEW, 0), (NEW, 1), (OLD, 1)], 0.75),
        # Another version's completion takes no part in the pairs.
        ([("policy-v0", 0), (OLD, 1), (NEW, 2)], 0.0),
    ],
)
def test_ranking_score_is_the_mean_over_cross_pairs(
    ranked: list[tuple[str, int]], score: float
) -> None:
    assert ranking_score(ranked, NEW, OLD) == score


@pytest.mark.parametrize(
    "ranked",
    [[(NEW, 0), (NEW, 1)], [(OLD, 0), ("policy-v0", 1)], []],
)
def test_a_ranking_without_both_sides_does_not_count(ranked: list[tuple[str, int]]) -> None:
    assert ranking_score(ranked, NEW, OLD) is None


def test_only_rankings_with_both_sides_are_scored() -> None:
    rankings = [[(NEW, 0), (OLD, 1)], [(NEW, 0), (NEW, 1)], [(OLD, 0), (NEW, 0)]]
    assert scores(rankings, NEW, OLD) == [1.0, 0.5]


# -- the interval ----------------------------------------------------------------------------------


def test_wilson_interval_matches_the_hand_computed_value() -> None:
    # 8 of 10 at 95%: z = 1.959964, z^2/n = 0.384146; centre = (0.8 + 0.192073) / 1.384146 =
    # 0.716740; half = 1.959964 / 1.384146 * sqrt(0.016 + 0.009604) = 0.226578.
    lower, upper = wilson_interval(0.8, 10, 0.95)
    assert lower == pytest.approx(0.490162, abs=1e-5)
    assert upper == pytest.approx(0.943318, abs=1e-5)


def test_wilson_interval_of_all_wins_stays_below_one() -> None:
    # p = 1, n = 10: centre = 1.192073 / 1.384146 = 0.861234; half = 1.416010 * sqrt(0.009604)
    # = 0.138766.
    lower, upper = wilson_interval(1.0, 10, 0.95)
    assert lower == pytest.approx(0.722467, abs=1e-5)
    assert upper == pytest.approx(1.0)


def test_wilson_interval_is_symmetric_and_narrows_with_n_and_lower_confidence() -> None:
    lo, hi = wilson_interval(0.3, 20, 0.95)
    assert wilson_interval(0.7, 20, 0.95) == pytest.approx((1 - hi, 1 - lo))
    assert wilson_interval(0.3, 200, 0.95)[1] - wilson_interval(0.3, 200, 0.95)[0] < hi - lo
    assert wilson_interval(0.3, 20, 0.8)[1] - wilson_interval(0.3, 20, 0.8)[0] < hi - lo


def test_no_rankings_means_no_knowledge() -> None:
    assert wilson_interval(0.0, 0, 0.95) == (0.0, 1.0)
    assert tally([], 0.95) == Tally(0, 0, 0, 0, 0.0, 0.0, 1.0)


# -- the tally and the decision --------------------------------------------------------------------


def test_tally_counts_ties_as_half_and_rankings_by_their_score() -> None:
    t = tally([1.0, 0.5, 0.0, 0.75], 0.95)
    assert (t.rankings, t.wins, t.losses, t.ties) == (4, 2, 1, 1)
    assert t.win_rate == pytest.approx(2.25 / 4)
    assert (t.lower, t.upper) == pytest.approx(wilson_interval(2.25 / 4, 4, 0.95))


DEFAULTS = Thresholds(confidence=0.95, promote_above=0.5, retire_below=0.5, min_rankings=10)


def test_promotes_once_the_lower_bound_clears_and_enough_rankings_count() -> None:
    # All wins clear 0.5 from 4 rankings on (lower 0.510), but 10 must count first.
    assert decide(tally([1.0] * 9, 0.95), DEFAULTS) is None
    assert decide(tally([1.0] * 10, 0.95), DEFAULTS) == "promoted"
    assert decide(tally([1.0] * 4, 0.95), DEFAULTS._replace(min_rankings=4)) == "promoted"
    assert decide(tally([1.0] * 3, 0.95), DEFAULTS._replace(min_rankings=3)) is None


def test_retires_once_the_upper_bound_falls_below() -> None:
    assert decide(tally([0.0] * 10, 0.95), DEFAULTS) == "retired"
    assert decide(tally([0.0] * 9, 0.95), DEFAULTS) is None


def test_ties_alone_never_decide() -> None:
    assert decide(tally([0.5] * 1000, 0.95), DEFAULTS) is None


def test_thresholds_move_the_decision() -> None:
    eight_of_ten = tally([1.0] * 8 + [0.0] * 2, 0.95)  # lower 0.490
    assert decide(eight_of_ten, DEFAULTS) is None
    assert decide(eight_of_ten, DEFAULTS._replace(promote_above=0.45)) == "promoted"
    assert decide(eight_of_ten, DEFAULTS._replace(confidence=0.8)) is None  # judged as tallied
    assert decide(tally([1.0] * 8 + [0.0] * 2, 0.8), DEFAULTS) == "promoted"  # lower 0.602
    assert decide(tally([0.0] * 10, 0.95), DEFAULTS._replace(retire_below=0.2)) is None


# -- the blind mix ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_seats_split_k_in_half(k: int) -> None:
    rng = random.Random(0)
    counts = {sum(challenger_seats(k, rng)) for _ in range(50)}
    assert counts == ({k // 2} if k % 2 == 0 else {k // 2, k // 2 + 1})


def test_seats_are_shuffled() -> None:
    rng = random.Random(0)
    orders = {tuple(challenger_seats(4, rng)) for _ in range(100)}
    assert len(orders) == 6  # every arrangement of two challenger and two champion seats
