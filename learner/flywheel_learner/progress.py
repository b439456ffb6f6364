"""How the learner reports: one `event=NAME key=value ...` line per event, and per training step
a tqdm bar on a terminal or a log line otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("flywheel.learner")


def kv(event: str, **fields: Any) -> str:
    """One structured log line: `event=NAME key=value ...` (floats to 4 significant digits)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text if ' ' not in text else repr(text)}")
    return " ".join(parts)


class Progress:
    """A tqdm bar per training loop on a terminal; key=value log lines per step otherwise."""

    def __init__(self, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar: Any = None

    def steps(self, total: int, desc: str) -> Iterator[int]:
        if not self.tty:
            yield from range(total)
            return
        from tqdm.auto import tqdm

        try:
            with tqdm(total=total, desc=desc, leave=False) as self._bar:
                for step in range(total):
                    yield step
                    self._bar.update(1)
        finally:  # also when the caller stops early
            self._bar = None

    def step(self, event: str, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3g}" if isinstance(v, float) else v
                                   for k, v in fields.items()}, refresh=False)  # fmt: skip
        else:
            log.info(kv(event, **fields))
