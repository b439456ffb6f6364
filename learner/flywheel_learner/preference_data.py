"""Existing preference data (JSON Lines) -> rankings, to fit a reward model before live feedback.

Each line is one comparison, in either of the two common shapes (detected per line):

    {"prompt": "...", "chosen": "...", "rejected": "..."}
        chosen/rejected may also be chat message lists; the final assistant message is the
        response ({"role": "assistant", "content": "..."}).
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}   (Anthropic HH-RLHF)
        whole transcripts: everything up to and including the last "\\n\\nAssistant:" is the
        prompt (it must be the same in both), the rest of each transcript is its response.
    {"prompt": "...", "ranking": [["best", "tied with best"], ["next"], ...]}
        a K-way ranking with ties, as `flywheel export --format rankings` writes it.

The result is the shape `reward.fit_reward_model` takes: (prompt, ((chosen,), (rejected,))).
Pure parsing, stdlib only; a .gz file is read through gzip.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# (prompt_text, tiers of completion texts, best first; texts within a tier are tied)
Ranking = tuple[str, tuple[tuple[str, ...], ...]]

HH_ASSISTANT = "\n\nAssistant:"
FORMATS = (
    '{"prompt", "chosen", "rejected"} (responses as strings or chat message lists), '
    'HH-RLHF {"chosen", "rejected"} (whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts) '
    'or {"prompt", "ranking": [[best, ...], [next, ...], ...]}'
)


class PreferenceDataError(ValueError):
    """A line that is not a usable comparison; `path` and `line` (1-based) say where."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


class _BadLine(Exception):
    """A problem with one record; the reader adds the file and line number."""


def read_preferences(
    path: str | Path, *, strict: bool = True, skipped: list[PreferenceDataError] | None = None
) -> list[Ranking]:
    """Every comparison in the JSONL file at `path`, in file order. See `iter_preferences`."""
    return list(iter_preferences(path, strict=strict, skipped=skipped))


def iter_preferences(
    path: str | Path, *, strict: bool = True, skipped: list[PreferenceDataError] | None = None
) -> Iterator[Ranking]:
    """Comparisons one line at a time, so a large file is never held in memory whole.

    strict: the first bad line raises PreferenceDataError naming the file and line. With
    strict=False bad lines are skipped; pass a list as `skipped` to collect (and count) them.
    Blank lines are ignored.
    """
    name = str(path)
    with _open(Path(path)) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield _parse_record(_json_object(line))
            except _BadLine as e:
                error = PreferenceDataError(name, number, str(e))
                if strict:
                    raise error from e
                if skipped is not None:
                    skipped.append(error)


def _parse_record(record: dict[str, Any]) -> Ranking:
    """One decoded line -> (prompt, ((chosen,), (rejected,))); raises _BadLine if unusable."""
    if "ranking" in record:
        return _parse_ranking(record)
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise _BadLine(
            f"missing key {', '.join(repr(k) for k in missing)}; expected {FORMATS}, "
            f"got keys {sorted(record)}"
        )
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise _BadLine(f"'prompt' must be a non-empty string, got {_show(prompt)}")
        chosen = _response("chosen", record["chosen"])
        rejected = _response("rejected", record["rejected"])
    else:
        prompt, chosen, rejected = _split_transcripts(record["chosen"], record["rejected"])
        # An empty response given as such is data (a labeler ranked an empty completion); in a
        # transcript it means the split went wrong.
        for key, response in (("chosen", chosen), ("rejected", rejected)):
            if not response.strip():
                raise _BadLine(f"{key!r} has an empty response")
    if chosen == rejected:
        raise _BadLine("'chosen' and 'rejected' are the same response; a pair needs two")
    return prompt, ((chosen,), (rejected,))


def _parse_ranking(record: dict[str, Any]) -> Ranking:
    """{"prompt", "ranking": [[texts of the best tier], [next], ...]} -> (prompt, tiers)."""
    prompt, ranking = record.get("prompt"), record["ranking"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadLine(f"'prompt' must be a non-empty string, got {_show(prompt)}")
    ok = isinstance(ranking, list) and all(
        isinstance(tier, list) and tier and all(isinstance(t, str) for t in tier)
        for tier in ranking
    )
    if not ok or len(ranking) < 2:
        raise _BadLine(
            f"'ranking' must be a list of at least 2 tiers, each a non-empty list of response "
            f"strings, best first; got {_show(ranking)}"
        )
    return prompt, tuple(tuple(tier) for tier in ranking)


def _response(key: str, value: Any) -> str:
    """A response given as a string, or as a chat whose final assistant message it is."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for message in reversed(value):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise _BadLine(
                    f"{key!r} must be a string or a list of {{'role', 'content'}} messages, "
                    f"got an item {_show(message)}"
                )
            if message.get("role") == "assistant":
                return str(message["content"])
        raise _BadLine(f"{key!r} is a chat with no assistant message to take as the response")
    raise _BadLine(f"{key!r} must be a string or a list of chat messages, got {_show(value)}")


def _split_transcripts(chosen: Any, rejected: Any) -> tuple[str, str, str]:
    """HH-RLHF: the shared prefix through the last "\\n\\nAssistant:" is the prompt."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise _BadLine(
            "without a 'prompt', 'chosen' and 'rejected' must be HH-RLHF transcript strings "
            f"(or add a 'prompt' key for chat message lists), got {_show(chosen)} and "
            f"{_show(rejected)}"
        )
    parts = []
    for key, transcript in (("chosen", chosen), ("rejected", rejected)):
        cut = transcript.rfind(HH_ASSISTANT)
        if cut < 0:
            raise _BadLine(
                f"{key!r} has no '\\n\\nAssistant:' turn; without a 'prompt' key each side must "
                "be a whole HH-RLHF transcript"
            )
        end = cut + len(HH_ASSISTANT)
        parts.append((transcript[:end], transcript[end:]))
    (chosen_prompt, chosen_response), (rejected_prompt, rejected_response) = parts
    if chosen_prompt != rejected_prompt:
        raise _BadLine(
            "'chosen' and 'rejected' transcripts have different prompts (everything up to the "
            "last '\\n\\nAssistant:' must match), so they do not answer the same conversation"
        )
    return chosen_prompt, chosen_response, rejected_response


def _json_object(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine(f"not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object per line, got {type(record).__name__}")
    return record


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
