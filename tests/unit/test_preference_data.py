"""Importing existing preference data: both JSONL shapes, chat lists, errors with line numbers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from flywheel_learner.preference_data import (
    PreferenceDataError,
    iter_preferences,
    read_preferences,
)

pytestmark = pytest.mark.unit


def write_jsonl(path: Path, *records: object) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_prompt_chosen_rejected_strings(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "add: 2 + 3", "chosen": "5", "rejected": "6"},
        {"prompt": "reverse: abc", "chosen": "cba", "rejected": "abc", "extra": 1},
    )
    assert read_preferences(path) == [
        ("add: 2 + 3", (("5",), ("6",))),
        ("reverse: abc", (("cba",), ("abc",))),
    ]


def test_chat_lists_take_the_final_assistant_message(tmp_path: Path) -> None:
    chosen = [
        {"role": "user", "content": "add: 2 + 3"},
        {"role": "assistant", "content": "let me think"},
        {"role": "user", "content": "just the number"},
        {"role": "assistant", "content": "5"},
    ]
    rejected = [{"role": "user", "content": "add: 2 + 3"}, {"role": "assistant", "content": "6"}]
    path = write_jsonl(
        tmp_path / "chat.jsonl", {"prompt": "add: 2 + 3", "chosen": chosen, "rejected": rejected}
    )
    assert read_preferences(path) == [("add: 2 + 3", (("5",), ("6",)))]


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(tmp_path: Path) -> None:
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: add: 2 + 3\n\nAssistant:"
    path = write_jsonl(
        tmp_path / "hh.jsonl", {"chosen": prefix + " 5", "rejected": prefix + " six, I think"}
    )
    [(prompt, tiers)] = read_preferences(path)
    assert prompt == prefix
    assert tiers == ((" 5",), (" six, I think",))


def test_both_formats_and_blank_lines_in_one_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        "",
        {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"},
    )
    rankings = list(iter_preferences(path))
    assert [r[0] for r in rankings] == ["p", "\n\nHuman: q\n\nAssistant:"]


def test_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert read_preferences(path) == [("p", (("a",), ("b",)))]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"prompt": "p", "chosen": "a"}, "missing key 'rejected'"),
        ({"text": "a"}, "missing key 'chosen', 'rejected'"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "same response"),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            "'chosen' has an empty response",
        ),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "must be a string or a list"),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "no assistant message",
        ),
        ({"chosen": "no turns here", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "no '\\n\\n"),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: r\n\nAssistant: b"},
            "different prompts",
        ),
        ({"chosen": [], "rejected": []}, "add a 'prompt' key"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path: Path, bad: object, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", {"prompt": "p", "chosen": "a", "rejected": "b"}, bad)
    with pytest.raises(PreferenceDataError) as info:
        read_preferences(path)
    assert info.value.line == 2
    assert str(info.value).startswith(f"{path}:2: ")
    assert message in str(info.value)


def test_not_strict_skips_and_counts_bad_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "some-bad.jsonl",
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        "{oops",
        {"prompt": "p2", "chosen": "same", "rejected": "same"},
        {"prompt": "p3", "chosen": "c", "rejected": "d"},
    )
    skipped: list[PreferenceDataError] = []
    rankings = read_preferences(path, strict=False, skipped=skipped)
    assert [prompt for prompt, _ in rankings] == ["p1", "p3"]
    assert [e.line for e in skipped] == [2, 3]
    assert read_preferences(path, strict=False) == rankings  # collecting is optional


def test_rankings_fit_the_reward_trainers_shape(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", {"prompt": "p", "chosen": "a", "rejected": "b"})
    [(prompt, tiers)] = read_preferences(path)
    assert isinstance(prompt, str)
    assert sum(1 for tier in tiers if tier) >= 2  # what reward._validate requires
