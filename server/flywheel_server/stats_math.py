"""The dashboard's arithmetic, pure: labeler agreement and Bradley-Terry ratings of policies.

Rankings arrive as tiers of ids, best first (ties share a tier). Both figures read the ordered
pairs a ranking implies: (a, b) when a sits in a better tier than b.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

Tiers = Sequence[Sequence[str]]


def tier_of(tiers: Tiers) -> dict[str, int]:
    return {item: t for t, items in enumerate(tiers) for item in items}


def pair_agreement(first: Tiers, second: Tiers) -> tuple[int, int]:
    """(pairs ordered alike, pairs compared) over the items both rankings hold: a pair counts
    when at least one labeler ordered it; a tie against an order is a disagreement."""
    a, b = tier_of(first), tier_of(second)
    common = sorted(set(a) & set(b))
    alike = compared = 0
    for x, y in combinations(common, 2):
        da, db = _sign(a[x] - a[y]), _sign(b[x] - b[y])
        if da == 0 and db == 0:
            continue  # both tied it: no preference to agree on
        compared += 1
        alike += da == db
    return alike, compared


@dataclass(frozen=True)
class Agreement:
    pairs: int  # candidate pairs compared on shared tasks
    rate: float  # share ordered alike (NaN: none compared)
    by_labeler: dict[str, tuple[int, float]]  # labeler -> (pairs, rate) against the others


def agreement(shared: Mapping[str, Mapping[str, Tiers]]) -> Agreement:
    """Agreement on shared comparisons: shared[comparison][labeler] = that labeler's ranking.
    Every two labelers of a comparison are one pairing."""
    alike = compared = 0
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rankings in shared.values():
        for (la, ra), (lb, rb) in combinations(sorted(rankings.items()), 2):
            same, pairs = pair_agreement(ra, rb)
            alike, compared = alike + same, compared + pairs
            for labeler in (la, lb):
                per[labeler][0] += same
                per[labeler][1] += pairs
    return Agreement(
        compared,
        _rate(alike, compared),
        {name: (pairs, _rate(same, pairs)) for name, (same, pairs) in sorted(per.items())},
    )


def wins(rankings: Sequence[tuple[Tiers, Mapping[str, str]]]) -> dict[tuple[str, str], int]:
    """Wins between players (policy versions): rankings[i] = (tiers of completion ids,
    completion id -> its policy). A pair of completions of one policy says nothing."""
    out: dict[tuple[str, str], int] = defaultdict(int)
    for tiers, player in rankings:
        tier = tier_of(tiers)
        for x, y in combinations(sorted(tier), 2):
            px, py = player.get(x), player.get(y)
            if px is None or py is None or px == py or tier[x] == tier[y]:
                continue
            winner, loser = (px, py) if tier[x] < tier[y] else (py, px)
            out[(winner, loser)] += 1
    return dict(out)


def bradley_terry(
    games: Mapping[tuple[str, str], int], iterations: int = 200, prior: float = 0.5
) -> dict[str, float]:
    """Bradley-Terry strengths on a log scale (Elo-like: 400 / ln 10 per unit), centred at 0,
    fitted by Hunter's (2004) MM updates. `prior` adds that many virtual wins and losses
    against each opponent met, so a player who never lost stays finite."""
    players = sorted({p for pair in games for p in pair})
    if not players:
        return {}
    won: dict[str, float] = defaultdict(float)
    met: dict[tuple[str, str], float] = defaultdict(float)
    for (w, l_), n in games.items():
        won[w] += n
        met[(w, l_)] += n
        met[(l_, w)] += n
    for a, b in list(met):
        won[a] += prior
        met[(a, b)] += 2 * prior
    strength = dict.fromkeys(players, 1.0)
    for _ in range(iterations):
        new = {}
        for p in players:
            denominator = sum(
                n / (strength[p] + strength[q]) for (a, q), n in met.items() if a == p
            )
            new[p] = won[p] / denominator if denominator else strength[p]
        mean = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        strength = {p: v / mean for p, v in new.items()}
    scale = 400 / math.log(10)
    return {p: scale * math.log(v) for p, v in strength.items()}


@dataclass(frozen=True)
class Rating:
    player: str
    rating: float  # Elo-scaled, the players' mean at 0
    low: float  # the bootstrap interval
    high: float
    games: int


def rate_players(
    games: Mapping[tuple[str, str], int], samples: int = 200, level: float = 0.95, seed: int = 0
) -> list[Rating]:
    """Bradley-Terry ratings with percentile bootstrap intervals (games resampled with
    replacement), best first."""
    point = bradley_terry(games)
    flat = [pair for pair, n in games.items() for _ in range(n)]
    rng = random.Random(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    for _ in range(samples if flat else 0):
        resampled: dict[tuple[str, str], int] = defaultdict(int)
        for pair in rng.choices(flat, k=len(flat)):
            resampled[pair] += 1
        fitted = bradley_terry(resampled, iterations=100)
        for p in point:
            draws[p].append(fitted.get(p, math.nan))
    played: dict[str, int] = defaultdict(int)
    for (w, l_), n in games.items():
        played[w] += n
        played[l_] += n
    out = []
    for p, value in point.items():
        finite = sorted(v for v in draws[p] if math.isfinite(v))
        low, high = _percentiles(finite, level) if finite else (math.nan, math.nan)
        out.append(Rating(p, value, low, high, played[p]))
    return sorted(out, key=lambda r: -r.rating)


def _percentiles(values: Sequence[float], level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    last = len(values) - 1
    return values[round(tail * last)], values[round((1 - tail) * last)]


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else math.nan
