"""The human anchor: what the labelers' own rankings say of two policies' answers (issue 15).

Every model the gate can ask (the reward model PPO optimised, the judge fitted beside it) learns
from rankings of *sampled* completions, and can miss what sampling rarely shows it. Under
`correct`, candidates turned a third of the greedy answers into near misses (`reverse: pbc` ->
`cbc`), and both models scored them higher; the labelers' rankings of the same prompts, where
both answers were among the ranked completions, preferred the live policy's answer 25 to 7.

So the gate also compares greedy answers on prompts the labelers ranked: where the candidate
answers differently from the live policy and a ranking of that prompt holds both answers, the
ranking is the verdict, no model in between. Answers no one ranked say nothing. Only held-out
rankings count: the reward model trained on the others, and a policy optimised against it can
reproduce what it memorised there. Against policy-v0, on the newest 128 held-out prompts at the
end of a `correct` run, that run's six candidates lost 1-10, 2-7, 1-15, 5-15, 5-16 and 6-19.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from flywheel_model.scoring import RankingText


class Verdicts(NamedTuple):
    """Prompts whose ranking placed the candidate's answer above the live one's, below, level."""

    wins: int
    losses: int
    ties: int

    @property
    def decisive(self) -> int:
        """Prompts whose rankings put one answer above the other."""
        return self.wins + self.losses


NO_VERDICTS = Verdicts(0, 0, 0)


class RankedPrompts:
    """The tiers of every ranking, by prompt, answers compared without surrounding whitespace."""

    def __init__(self, rankings: Iterable[RankingText]) -> None:
        self._tiers: dict[str, list[list[set[str]]]] = {}
        for prompt, tiers in rankings:
            clean = [{text.strip() for text in tier} for tier in tiers]
            self._tiers.setdefault(prompt, []).append(clean)

    def verdict(self, prompt: str, ours: str, theirs: str) -> int | None:
        """+1 when the rankings of `prompt` put `ours` above `theirs` more often than below, -1
        for the reverse, 0 when level; None when no ranking holds both answers."""
        votes, seen = 0, False
        for tiers in self._tiers.get(prompt, ()):
            a = _tier_of(tiers, ours.strip())
            b = _tier_of(tiers, theirs.strip())
            if a is None or b is None:
                continue
            seen = True
            votes += (a < b) - (a > b)
        return None if not seen else (votes > 0) - (votes < 0)

    def compare(
        self, prompts: Sequence[str], ours: Sequence[str], theirs: Sequence[str]
    ) -> Verdicts:
        """The verdicts on the prompts where `ours` and `theirs` differ."""
        found = [
            self.verdict(p, a, b)
            for p, a, b in zip(prompts, ours, theirs, strict=True)
            if a.strip() != b.strip()
        ]
        return Verdicts(found.count(1), found.count(-1), found.count(0))


def newest_prompts(rankings: Sequence[RankingText], limit: int) -> list[str]:
    """Up to `limit` distinct prompts of `rankings` (ordered oldest first), newest first."""
    return list(dict.fromkeys(prompt for prompt, _ in reversed(rankings)))[:limit]


def _tier_of(tiers: Sequence[set[str]], answer: str) -> int | None:
    return next((i for i, tier in enumerate(tiers) if answer in tier), None)
