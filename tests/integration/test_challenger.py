"""Champion / challenger over the public API: blind comparisons, the running tally, and the
automatic promotion or retirement of the challenger once its interval clears a threshold.

The labeler here judges by text alone, as a person would: each adapter is scaled up so its
greedy completion differs from the other's, and the test learns each version's text by
pinning it, then ranks the blind candidates by which text they show.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel_client import (
    ChallengeTally,
    Conflict,
    FlywheelClient,
    HttpClient,
    InvalidArgument,
)
from flywheel_model import loading
from flywheel_server.challenge import wilson_interval
from tests.support import ServerProcess, make_adapter

pytestmark = pytest.mark.integration

PROMPT = "reverse: flywheel"
GREEDY = {"temperature": 0.0, "max_tokens": 6}
MIN_RANKINGS = 4  # all wins: the lower bound clears 0.5 at 4 rankings (0.510), not at 3 (0.439)


@pytest.fixture(scope="module")
def arena(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server where every comparison without explicit policies carries a running challenge."""
    args = ["--challenger-share", "1", "--challenger-min-rankings", str(MIN_RANKINGS)]
    proc = ServerProcess(tiny_model, tmp_path_factory.mktemp("arena"), args=args).start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Duel:
    """A champion and a challenger version, and a labeler who tells them apart by text."""

    client: FlywheelClient
    champion: str  # version id
    challenger: str
    texts: dict[str, str]  # version id -> its greedy completion of PROMPT

    def compare(self, k: int = 2) -> tuple[list[str], list[str]]:
        """A blind comparison: (the challenger's candidate ids, the champion's)."""
        candidates = self.client.compare(PROMPT, k=k, **GREEDY).candidates
        assert [c.policy for c in candidates] == [""] * k  # blind: no version shown
        ours = [c.id for c in candidates if c.text == self.texts[self.challenger]]
        theirs = [c.id for c in candidates if c.text == self.texts[self.champion]]
        assert len(ours) + len(theirs) == k, [c.text for c in candidates]
        assert {len(ours), len(theirs)} == {k // 2, k - k // 2}  # half each
        return ours, theirs

    def tally(self) -> ChallengeTally:
        challenge = self.client.versions().challenge
        assert challenge is not None
        assert (challenge.challenger, challenge.champion) == (self.challenger, self.champion)
        return challenge

    def states(self) -> dict[str, str]:
        return {v.id: v.state for v in self.client.versions("policy").versions}


def greedy_text(client: FlywheelClient, policy: str) -> str:
    return client.generate(PROMPT, policy=policy, **GREEDY).completions[0].text


def publish(
    client: FlywheelClient, server: ServerProcess, tmp_path: Path, seed: int, **flags: bool
) -> str:
    version = client.publish_adapter(
        make_adapter(server.model, tmp_path / f"adapter-{seed}", seed=seed, scale=20.0),
        name="policy",
        base_model=loading.base_fingerprint(server.model),
        **flags,
    )
    assert version.state == ("live" if flags.get("promote") else "ready")
    return version.id


def setup_duel(
    client: FlywheelClient, server: ServerProcess, tmp_path: Path, seeds: tuple[int, int]
) -> Duel:
    """A fresh live champion, then a challenger published as such."""
    champion = publish(client, server, tmp_path, seeds[0], promote=True)
    challenger = publish(client, server, tmp_path, seeds[1], challenger=True)
    texts = {v: greedy_text(client, v) for v in (champion, challenger)}
    assert texts[champion] != texts[challenger], "the adapters must differ for the labeler"
    return Duel(client, champion, challenger, texts)


def policies_json(server: ServerProcess) -> dict:
    r = httpx.get(f"{server.http}/v1/policies", timeout=30)
    r.raise_for_status()
    return r.json()


def decisions(server: ServerProcess, outcome: str) -> float:
    page = httpx.get(f"{server.http}/metrics", timeout=30).text
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == "flywheel_challenger_decisions_total" and s.labels == {"outcome": outcome}:
                return s.value
    return 0.0


def test_a_challenger_that_keeps_winning_is_promoted(arena, tmp_path):
    promoted_before = decisions(arena, "promoted")
    with FlywheelClient(arena.grpc) as client:
        duel = setup_duel(client, arena, tmp_path, seeds=(1, 2))
        t = duel.tally()
        assert (t.outcome, t.rankings, t.wins, t.lower, t.upper) == ("running", 0, 0, 0.0, 1.0)
        assert (t.share, t.confidence, t.promote_above, t.retire_below, t.min_rankings) == (
            1.0,
            0.95,
            0.5,
            0.5,
            MIN_RANKINGS,
        )
        assert duel.states()[duel.challenger] == "ready"

        for n in range(1, MIN_RANKINGS + 1):
            ours, theirs = duel.compare()
            client.rank([ours[0], theirs[0]], labeler="challenger-fan")
            t = duel.tally()
            assert (t.rankings, t.wins, t.losses, t.ties, t.win_rate) == (n, n, 0, 0, 1.0)
            assert (t.lower, t.upper) == pytest.approx(wilson_interval(1.0, n, 0.95))
            if n < MIN_RANKINGS:
                assert t.outcome == "running" and t.lower <= 0.5
                assert client.versions().live["policy"] == duel.champion

        # The last ranking cleared the bound: the challenger went live, the champion retired.
        assert t.outcome == "promoted" and t.lower > 0.5 and t.ended_at is not None
        assert client.versions().live["policy"] == duel.challenger
        assert duel.states()[duel.challenger] == "live"
        assert duel.states()[duel.champion] == "retired"
        body = policies_json(arena)
        assert body["live"]["policy"] == duel.challenger
        assert body["challenge"]["outcome"] == "promoted"
        assert (body["challenge"]["wins"], body["challenge"]["rankings"]) == (4, 4)
        with HttpClient(arena.http) as http:
            assert http.versions().challenge == t  # the same tally over both transports
        # The challenge is over: comparisons come from the new live policy, and say so.
        candidates = client.compare(PROMPT, k=2, **GREEDY).candidates
        assert [c.policy for c in candidates] == [duel.challenger] * 2
    assert decisions(arena, "promoted") == promoted_before + 1


def test_a_challenger_that_keeps_losing_is_retired(arena, tmp_path):
    with FlywheelClient(arena.grpc) as client:
        champion = publish(client, arena, tmp_path, 3, promote=True)
        contender = publish(client, arena, tmp_path, 4)  # plain ready; challenged over HTTP
        status, started = arena.post(
            "/v1/policies/challenge", {"version": int(contender.rsplit("-v", 1)[1])}
        )
        assert status == 200, started
        assert (started["challenger"], started["champion"], started["outcome"]) == (
            contender,
            champion,
            "running",
        )
        texts = {v: greedy_text(client, v) for v in (champion, contender)}
        assert texts[champion] != texts[contender]
        duel = Duel(client, champion, contender, texts)

        for n in range(1, MIN_RANKINGS + 1):
            ours, theirs = duel.compare()
            client.rank([theirs[0], ours[0]], labeler="champion-fan")
            t = duel.tally()
            assert (t.rankings, t.wins, t.losses, t.win_rate) == (n, 0, n, 0.0)
            assert (t.outcome == "running") == (n < MIN_RANKINGS)

        assert t.outcome == "retired" and t.upper < 0.5
        assert client.versions().live["policy"] == champion
        assert duel.states()[contender] == "retired"
        assert policies_json(arena)["challenge"]["outcome"] == "retired"
        candidates = client.compare(PROMPT, k=2, **GREEDY).candidates
        assert [c.policy for c in candidates] == [champion] * 2


def test_ties_count_half_and_only_blind_comparisons_count(arena, tmp_path):
    with FlywheelClient(arena.grpc) as client:
        duel = setup_duel(client, arena, tmp_path, seeds=(5, 6))

        ours, theirs = duel.compare(k=4)  # two of each
        client.rank([ours, theirs], labeler="l")  # score 1: a win
        for _ in range(2):
            ours, theirs = duel.compare(k=4)
            # Tiers [a, x], [b, y]: pairs a=x (1/2), a>y (1), b<x (0), b=y (1/2): score 1/2.
            client.rank([[ours[0], theirs[0]], [ours[1], theirs[1]]], labeler="l")
        t = duel.tally()
        assert (t.rankings, t.wins, t.ties, t.losses) == (3, 1, 2, 0)
        assert t.win_rate == pytest.approx(2 / 3)
        assert (t.lower, t.upper) == pytest.approx(wilson_interval(2 / 3, 3, 0.95))

        # Explicit policies: the versions are named, and the ranking is not part of the tally.
        named = client.compare(PROMPT, k=2, policies=[duel.challenger, duel.champion], **GREEDY)
        assert [c.policy for c in named.candidates] == [duel.challenger, duel.champion]
        client.rank([c.id for c in named.candidates], labeler="l")
        assert duel.tally().rankings == 3

        ours, theirs = duel.compare()
        client.rank([theirs[0], ours[0]], labeler="l")  # a loss: mean (1 + 1/2 + 1/2 + 0) / 4
        t = duel.tally()
        assert (t.rankings, t.win_rate, t.outcome) == (4, 0.5, "running")  # undecided

        stopped = client.stop_challenge()
        assert (stopped.outcome, stopped.rankings, stopped.win_rate) == ("stopped", 4, 0.5)
        assert duel.tally().outcome == "stopped"
        assert duel.states()[duel.challenger] == "ready"
        assert client.versions().live["policy"] == duel.champion
        with pytest.raises(Conflict, match="no challenge is running"):
            client.stop_challenge()
        # Re-challenging starts a fresh tally against the same champion.
        again = client.challenge(int(duel.challenger.rsplit("-v", 1)[1]))
        assert (again.outcome, again.rankings, again.champion) == ("running", 0, duel.champion)
        client.stop_challenge()


def test_bad_challenges_are_refused(arena, tmp_path):
    base = loading.base_fingerprint(arena.model)
    with FlywheelClient(arena.grpc) as client:
        adapter = make_adapter(arena.model, tmp_path / "a", seed=7)
        with pytest.raises(InvalidArgument, match="promote or challenger, not both"):
            client.publish_adapter(
                adapter, name="policy", base_model=base, promote=True, challenger=True
            )
        reward = make_adapter(arena.model, tmp_path / "r", reward=True, seed=7)
        with pytest.raises(InvalidArgument, match="only a policy can be a challenger"):
            client.publish_adapter(reward, name="reward", base_model=base, challenger=True)
        live = client.versions().live["policy"]
        with pytest.raises(Conflict, match="only a ready version can be a challenger"):
            client.challenge(int(live.rsplit("-v", 1)[1]))

    assert arena.post("/v1/policies/challenge", {})[0] == 400
    assert arena.post("/v1/policies/challenge", {"version": 2, "stop": True})[0] == 400
    status, body = arena.post("/v1/policies/challenge", {"version": 999})
    assert status == 404 and "policy-v999" in body["error"]["message"]


def test_thresholds_are_configurable_and_the_tally_survives_a_restart(tiny_model, tmp_path):
    # Under the defaults, 4 straight wins promote; here 6 must count, and the lower bound at 90%
    # must clear 0.6 (5 wins: 0.649, already above; 6 wins: 0.689).
    args = [
        "--challenger-share", "1",
        "--challenger-min-rankings", "6",
        "--challenger-promote-above", "0.6",
        "--challenger-retire-below", "0.1",
        "--challenger-confidence", "0.9",
    ]  # fmt: skip
    data = tmp_path / "data"
    server = ServerProcess(tiny_model, data, args=args).start()
    try:
        with FlywheelClient(server.grpc) as client:
            duel = setup_duel(client, server, tmp_path, seeds=(8, 9))
            for _ in range(3):
                ours, theirs = duel.compare()
                client.rank([ours[0], theirs[0]], labeler="l")
    finally:
        server.stop()

    server = ServerProcess(tiny_model, data, args=args).start()  # same store, fresh process
    try:
        with FlywheelClient(server.grpc) as client:
            duel.client = client
            t = duel.tally()
            assert (t.outcome, t.rankings, t.wins) == ("running", 3, 3)
            assert (t.confidence, t.promote_above, t.retire_below, t.min_rankings) == (
                0.9,
                0.6,
                0.1,
                6,
            )
            for n in (4, 5, 6):
                ours, theirs = duel.compare()
                client.rank([ours[0], theirs[0]], labeler="l")
                t = duel.tally()
                assert t.lower == pytest.approx(wilson_interval(1.0, n, 0.9)[0])
                assert (t.outcome == "running") == (n < 6)
            assert t.outcome == "promoted" and t.lower > 0.6
            assert client.versions().live["policy"] == duel.challenger
    finally:
        server.stop()
