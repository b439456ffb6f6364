"""The `flywheel` command line against a real server: generate, compare, rank, score, policies."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support import FLYWHEEL

pytestmark = pytest.mark.integration


def cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLYWHEEL, *args, "--server", server.grpc], capture_output=True, text=True, timeout=120
    )


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_compare_then_rank_with_a_tie(server):
    [comparison] = json_lines(cli(server, "compare", "reverse: abc", "--k", "3", "--json"))
    ids = [c["id"] for c in comparison["candidates"]]
    assert len(ids) == 3
    before = server.counts()["rankings"]
    receipt = json_lines(
        cli(server, "rank", ids[0], f"{ids[1]}={ids[2]}", "--labeler", "cli-test", "--json")
    )
    assert receipt[0]["pairs"] == 2
    assert server.counts()["rankings"] == before + 1


def test_generate_score_and_policies(server):
    [generated] = json_lines(
        cli(server, "generate", "add: 2 + 2", "--n", "2", "--max-tokens", "4", "--json")
    )
    assert len({c["id"] for c in generated["completions"]}) == 2
    scores = json_lines(cli(server, "score", "add: 2 + 2", "4", "5", "--json"))
    assert len(scores[0]["scores"]) == 2
    policies = cli(server, "policies")
    assert (
        policies.returncode == 0
        and "policy-v0" in policies.stdout
        and "reward-v1" in policies.stdout
    )


def test_unknown_id_is_a_clear_error(server):
    result = cli(server, "rank", "cmpl-nope", "cmpl-nada")
    assert result.returncode == 1  # NOT_FOUND is the server's answer, not a usage error
    assert "unknown completion id" in result.stderr and "Traceback" not in result.stderr


def test_export_writes_datasets_that_import_reads_back(server, tmp_path):
    from flywheel_learner.preference_data import read_preferences

    [comparison] = json_lines(
        cli(server, "compare", "sort: cba", "--k", "3", "--max-tokens", "4", "--json")
    )
    c = {x["id"]: x["text"] for x in comparison["candidates"]}
    ids = list(c)
    cli(server, "rank", ids[0], f"{ids[1]}={ids[2]}", "--labeler", "exporter", "--json")
    for fmt in ("pairs", "rankings"):
        out = tmp_path / f"{fmt}.jsonl"
        exported = cli(
            server, "export", "--format", fmt, "--out", str(out), "--page", "1", "--json"
        )
        [summary] = json_lines(exported)  # one ranking per request: every page is read
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert summary["lines"] == len(records)
        assert summary["rankings"] == server.counts()["rankings"] >= 2
        mine = [r for r in records if r["labeler"] == "exporter"]
        back = [r for r in read_preferences(out) if r[0] == mine[0]["prompt"]]
        if fmt == "pairs":  # the best over each of the tied two; none between the tied
            assert {(r["chosen"], r["rejected"]) for r in mine} == {
                (c[ids[0]], c[ids[1]]), (c[ids[0]], c[ids[2]])
            }  # fmt: skip
            assert len(back) == 2
        else:
            [ranking] = mine
            assert ranking["ranking"][0] == [c[ids[0]]]
            assert sorted(ranking["ranking"][1]) == sorted([c[ids[1]], c[ids[2]]])
            assert [[list(t) for t in r[1]] for r in back] == [ranking["ranking"]]
    assert not list(tmp_path.glob(".*.partial"))
