"""Champion / challenger: the pure math of a challenge (scores, tally, interval, decision, mix).

A challenge puts a challenger policy against the champion (the live policy when it began) in
blind comparisons; labelers' rankings of those decide it. Only the standard library: the
service feeds these functions what the store holds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Literal, NamedTuple

Decision = Literal["promoted", "retired"]


class Tally(NamedTuple):
    rankings: int  # rankings counted
    wins: int  # rankings whose score is > 1/2
    losses: int  # < 1/2
    ties: int  # exactly 1/2
    win_rate: float  # mean score (a tie counts half); 0 before any ranking counts
    lower: float  # Wilson score interval of the mean score
    upper: float


class Thresholds(NamedTuple):
    confidence: float  # two-sided, of the interval
    promote_above: float  # promote once lower > this
    retire_below: float  # retire once upper < this
    min_rankings: int  # no decision before this many rankings count


def ranking_score(
    ranked: Iterable[tuple[str, int]], challenger: str, champion: str
) -> float | None:
    """The challenger's score in one ranking of (policy id, tier) items, tier 0 the best.

    The mean over every (challenger, champion) pair of its completions of 1 (the challenger's
    ranked better), 1/2 (tied) or 0; None when the ranking lacks either side.
    """
    items = list(ranked)
    ours = [tier for policy, tier in items if policy == challenger]
    theirs = [tier for policy, tier in items if policy == champion]
    if not ours or not theirs:
        return None
    points = sum(1.0 if a < b else 0.5 if a == b else 0.0 for a in ours for b in theirs)
    return points / (len(ours) * len(theirs))


def scores(
    rankings: Iterable[Iterable[tuple[str, int]]], challenger: str, champion: str
) -> list[float]:
    """The scores of the rankings that count: those holding both sides."""
    scored = (ranking_score(ranked, challenger, champion) for ranked in rankings)
    return [s for s in scored if s is not None]


def wilson_interval(mean: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval (Wilson, 1927) of a success rate `mean` over `n` trials.

    p = (mean + z^2 / 2n) / (1 + z^2 / n) +- z / (1 + z^2 / n) * sqrt(mean (1 - mean) / n +
    z^2 / 4n^2), z the two-sided normal quantile. A ranking's score lies in [0, 1], so its
    variance is at most mean (1 - mean): treating scores as Bernoulli trials errs on the wide side.
    """
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    z2n = z * z / n
    centre = (mean + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(mean * (1 - mean) / n + z2n / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def tally(scores: Sequence[float], confidence: float) -> Tally:
    """The running tally of a challenge from the scores of the rankings that count."""
    n = len(scores)
    mean = sum(scores) / n if n else 0.0
    lower, upper = wilson_interval(mean, n, confidence)
    wins = sum(s > 0.5 for s in scores)
    losses = sum(s < 0.5 for s in scores)
    return Tally(n, wins, losses, n - wins - losses, mean, lower, upper)


def decide(t: Tally, thresholds: Thresholds) -> Decision | None:
    """Promote once the interval clears promote_above, retire once it falls below retire_below."""
    if t.rankings < thresholds.min_rankings:
        return None
    if t.lower > thresholds.promote_above:
        return "promoted"
    if t.upper < thresholds.retire_below:
        return "retired"
    return None


def challenger_seats(k: int, rng: random.Random) -> list[bool]:
    """Which of k candidates come from the challenger: half each side, the odd one to a random
    side, in a shuffled order."""
    ours = k // 2 + (k % 2 if rng.random() < 0.5 else 0)
    seats = [True] * ours + [False] * (k - ours)
    rng.shuffle(seats)
    return seats
