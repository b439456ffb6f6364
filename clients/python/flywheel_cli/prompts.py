"""`flywheel prompts add FILE.jsonl`: queue prompts for labelers (admin key).

Each line of FILE is a JSON string, or an object with a "prompt" string (other fields, such as
an id or a source, are ignored). Each prompt is a user's message: the server renders it with
the model's chat template when it samples the candidates. Blank lines are skipped; a prompt
already queued is not queued again. Nothing is sent when a line is bad.
"""

from __future__ import annotations

import json
from pathlib import Path

BATCH = 1000  # prompts a call (the server's limit)


def read_prompts(path: Path) -> list[str]:
    """The prompts of a JSONL file; ValueError naming the line when one is not a prompt."""
    prompts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from e
            if isinstance(value, dict):
                value = value.get("prompt")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f'{path}:{number}: expected a JSON string or {{"prompt": "..."}}, '
                    f"got {line.strip()[:80]}"
                )
            prompts.append(value)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
