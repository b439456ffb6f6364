"""Ranking arguments: best first; a nested sequence is a tier of tied completion ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flywheel_client.errors import InvalidArgument

Tiers = tuple[tuple[str, ...], ...]
RankingArg = Sequence[str | Sequence[str]]

TIE = "="


def as_tiers(ranking: RankingArg) -> Tiers:
    """`["a", ["b", "c"], "d"]` -> `(("a",), ("b", "c"), ("d",))`. A plain string is its own
    tier (a str is itself a Sequence, so it is checked first)."""
    if isinstance(ranking, str):
        raise InvalidArgument(
            "ranking must be a sequence of completion ids, got a single string", field="ranking"
        )
    tiers = []
    for position, item in enumerate(ranking):
        tier = (item,) if isinstance(item, str) else tuple(item)
        if not tier or not all(isinstance(cid, str) and cid for cid in tier):
            raise InvalidArgument(
                f"ranking[{position}] must be a completion id or a non-empty sequence of ids, "
                f"got {item!r}",
                field="ranking",
            )
        tiers.append(tier)
    return tuple(tiers)


def parse_tiers(arguments: Iterable[str]) -> Tiers:
    """Command-line form: each argument is one tier, tied ids joined by '=' (`a=b c`)."""
    tiers = []
    for argument in arguments:
        tier = tuple(argument.split(TIE))
        if not all(tier):
            raise InvalidArgument(
                f"empty completion id in {argument!r}; join tied ids with '=', as in a=b",
                field="ranking",
            )
        tiers.append(tier)
    return tuple(tiers)
