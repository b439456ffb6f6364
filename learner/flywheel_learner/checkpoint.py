"""The learner's checkpoint: export cursors, the round number and any publish in flight.

`work_dir/state.json` is replaced atomically (temporary file, fsync, rename), so a learner
killed at any instant restarts from either the old state or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class PendingPublish:
    """An adapter about to be published; recorded before the upload so a restart can tell
    whether it landed (the server lists the sha256 of every version) instead of guessing."""

    kind: str  # "policy" | "reward"
    directory: str
    sha256: str
    metrics: dict[str, float]
    promote: bool
    challenger: bool = False  # run it against the live policy with live labelers instead


@dataclass(frozen=True)
class LearnerState:
    rankings_cursor: int = 0
    prompts_cursor: int = 0
    round: int = 0  # rounds completed
    rankings_at_last_round: int = 0
    last_round_at: float = 0.0  # unix time; 0 = never
    pending: PendingPublish | None = None
    # Local dirs of the newest reward adapter that passed rm_min_accuracy and of the newest
    # policy that went live: the next round trains against / continues from them.
    reward_dir: str = ""
    policy_dir: str = ""
    # Where the adaptive KL controller left beta (0: not started): every round resumes it, as
    # each round also resumes the live policy, whose KL to the reference it carries.
    kl_beta: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> LearnerState:
        return dataclasses.replace(self, **changes)


def load_state(work_dir: Path) -> LearnerState:
    """The checkpointed state, or a fresh one when there is none yet."""
    path = work_dir / STATE_FILE
    if not path.is_file():
        return LearnerState()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); restore it or delete it to re-export everything"
        ) from e
    pending = raw.pop("pending", None)
    known = {f.name for f in dataclasses.fields(LearnerState)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; was it written by another version?")
    return LearnerState(**raw, pending=PendingPublish(**pending) if pending else None)


def save_state(work_dir: Path, state: LearnerState) -> None:
    atomic_write_text(work_dir / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=2))
