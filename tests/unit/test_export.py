"""Rankings out as JSONL datasets, and back in through the learner's import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel_client.types import RankedCompletion, RankingRecord
from flywheel_learner.preference_data import read_preferences
from flywheel_proto.datasets import jsonl, lines

pytestmark = pytest.mark.unit


def record(*texts_and_tiers: tuple[str, int]) -> RankingRecord:
    completions = tuple(
        RankedCompletion(f"cmp-{i}", text, "policy-v1", tier)
        for i, (text, tier) in enumerate(texts_and_tiers)
    )
    return RankingRecord(7, "rnk-1", "prm-1", "Q?", completions, "ann", 5.0, user="u-9")


def test_pairs_take_every_better_worse_pair_and_none_within_a_tie() -> None:
    ranked = record(("b", 1), ("a", 0), ("c", 1), ("d", 2), ("a", 2))
    pairs = [(x["chosen"], x["rejected"]) for x in lines([ranked], "pairs")]
    # a over b, c, d (not over the second "a"); b and c (tied) over d and a
    assert pairs == [
        ("a", "b"),
        ("a", "c"),
        ("a", "d"),
        ("b", "d"),
        ("b", "a"),
        ("c", "d"),
        ("c", "a"),
    ]
    first = next(iter(lines([ranked], "pairs")))
    assert {k: first[k] for k in ("prompt", "labeler", "user", "ranking_id", "created_at")} == {
        "prompt": "Q?", "labeler": "ann", "user": "u-9", "ranking_id": "rnk-1", "created_at": 5.0
    }  # fmt: skip


def test_rankings_keep_the_tiers_and_both_formats_import_back(tmp_path: Path) -> None:
    ranked = record(("b", 1), ("a", 0), ("c", 1))
    [line] = lines([ranked], "rankings")
    assert line["ranking"] == [["a"], ["b", "c"]]
    for fmt, expected in (
        ("rankings", [("Q?", (("a",), ("b", "c")))]),
        ("pairs", [("Q?", (("a",), ("b",))), ("Q?", (("a",), ("c",)))]),
    ):
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines([ranked], fmt)))
        assert read_preferences(path) == expected
    with pytest.raises(ValueError, match="format must be one of"):
        list(lines([ranked], "csv"))


def test_a_line_separator_inside_a_completion_does_not_split_its_line(tmp_path: Path) -> None:
    # JSON leaves U+0085, U+2028 and U+2029 raw in strings; readers that split at every line
    # break (str.splitlines, many JSONL loaders) would cut the record in two
    ranked = record(("a\u2028b", 0), ("c\x85d\u2029", 1), ("é", 2))
    for fmt in ("rankings", "pairs"):
        text = "".join(jsonl(x) for x in lines([ranked], fmt))
        assert [json.loads(x) for x in text.splitlines()] == list(lines([ranked], fmt))
        assert "é" in text  # readable text, not ASCII escapes
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(text, encoding="utf-8")
        assert read_preferences(path)[0][1][0] == ("a\u2028b",)


def test_import_names_a_malformed_ranking_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "ranking": [["a"], []]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'ranking' must be a list of at least 2"):
        read_preferences(path)


def test_a_chat_prompts_lines_carry_its_messages_and_still_import_back(tmp_path: Path) -> None:
    from dataclasses import replace

    chat = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"})
    ranked = replace(record(("a", 0), ("b", 1)), messages=chat)
    for fmt in ("pairs", "rankings"):
        [line] = lines([ranked], fmt)
        assert line["messages"] == list(map(dict, chat)) and line["prompt"] == "Q?"
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(jsonl(line))
        assert read_preferences(path) == [("Q?", (("a",), ("b",)))]
    assert "messages" not in next(iter(lines([record(("a", 0), ("b", 1))], "pairs")))
