"""What the dashboard plots, as JSON (`GET /v1/stats/...`), so scripts can read the same numbers.

Figures over rankings read the newest `WINDOW` of them: labeling throughput per labeler and
day, agreement on shared comparisons (every labeler of a task ranks the same candidates), and
policy versions rated by Bradley-Terry from the rankings that set completions of different
versions against each other (a challenge's blind mixes, or comparisons pinned to versions).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from flywheel_server import stats_math
from flywheel_server.domain import AdapterVersion, RankingExport

WINDOW = 5000  # newest rankings the ranking figures read
REWARD_WINDOW = 200  # newest rankings the reward model scores for its agreement with labelers
DAY_S = 86400


def tiers(ranking: RankingExport) -> list[list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for c in ranking.completions:
        out[c.tier].append(c.completion_id)
    return [out[t] for t in sorted(out)]


def labelers(rankings: Sequence[RankingExport]) -> dict[str, Any]:
    """Rankings per labeler, in all and per UTC day."""
    per_day: dict[str, Counter[int]] = defaultdict(Counter)
    for r in rankings:
        per_day[r.labeler][int(r.created_at // DAY_S) * DAY_S] += 1
    return {
        "window": len(rankings),
        "labelers": [
            {
                "labeler": name,
                "rankings": sum(days.values()),
                "per_day": [{"day": day, "rankings": n} for day, n in sorted(days.items())],
            }
            for name, days in sorted(per_day.items())
        ],
    }


def agreement(rankings: Sequence[RankingExport]) -> dict[str, Any]:
    """Pairwise agreement between labelers who ranked the same comparison (the labeler's last
    ranking of it counts)."""
    shared: dict[str, dict[str, list[list[str]]]] = defaultdict(dict)
    for r in rankings:
        shared[r.prompt_id][r.labeler] = tiers(r)
    both = {p: by for p, by in shared.items() if len(by) > 1}
    result = stats_math.agreement(both)
    return {
        "window": len(rankings),
        "shared_comparisons": len(both),
        "pairs": result.pairs,
        "rate": _finite(result.rate),
        "labelers": [
            {"labeler": name, "pairs": pairs, "rate": _finite(rate)}
            for name, (pairs, rate) in result.by_labeler.items()
        ],
    }


async def reward_agreement(
    rankings: Sequence[RankingExport], score: Callable[[str, list[str]], Awaitable[list[float]]]
) -> dict[str, Any]:
    """Each labeler's agreement with the reward model: the candidates of their rankings,
    ordered by the reward model's scores (equal scores tie), against their own order."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rankings:
        ids = [c.completion_id for c in r.completions]
        scores = await score(r.prompt, [c.text for c in r.completions])
        by_score: dict[float, list[str]] = defaultdict(list)
        for cid, value in zip(ids, scores, strict=True):
            by_score[value].append(cid)
        model = [by_score[v] for v in sorted(by_score, reverse=True)]
        same, pairs = stats_math.pair_agreement(tiers(r), model)
        per[r.labeler][0] += same
        per[r.labeler][1] += pairs
    alike, compared = sum(a for a, _ in per.values()), sum(p for _, p in per.values())
    return {
        "window": len(rankings),
        "pairs": compared,
        "rate": _finite(alike / compared if compared else math.nan),
        "labelers": [
            {"labeler": name, "pairs": pairs, "rate": _finite(same / pairs if pairs else math.nan)}
            for name, (same, pairs) in sorted(per.items())
        ],
    }


def ratings(rankings: Sequence[RankingExport]) -> dict[str, Any]:
    """Policy versions rated from blind comparisons: Elo-scaled Bradley-Terry strengths with
    95% bootstrap intervals, best first."""
    games = stats_math.wins(
        [(tiers(r), {c.completion_id: c.policy for c in r.completions}) for r in rankings]
    )
    return {
        "window": len(rankings),
        "games": sum(games.values()),
        "ratings": [_rating(r) for r in stats_math.rate_players(games)],
    }


def versions(
    versions: Sequence[AdapterVersion], live: dict[str, str], challenge: dict[str, Any] | None
) -> dict[str, Any]:
    """Every version with its state and the metrics its learner published (reward gain, KL,
    pretraining loss; a reward model's held-out accuracy), oldest first; the live aliases;
    the running challenge's tally."""
    return {
        "versions": [
            _version(v) for v in sorted(versions, key=lambda v: (v.created_at, v.name, v.version))
        ],
        "live": live,
        "challenge": challenge,
    }


def _rating(r: stats_math.Rating) -> dict[str, Any]:
    return {"policy": r.player, "rating": r.rating, "low": _finite(r.low),
            "high": _finite(r.high), "games": r.games}  # fmt: skip


def _version(v: AdapterVersion) -> dict[str, Any]:
    return {"id": v.id, "name": v.name, "version": v.version, "state": v.state,
            "created_at": v.created_at,
            "metrics": {k: _finite(x) for k, x in v.metrics.items()}}  # fmt: skip


def _finite(x: float) -> float | None:
    """JSON has no NaN: a figure with nothing to measure is null."""
    return x if math.isfinite(x) else None
