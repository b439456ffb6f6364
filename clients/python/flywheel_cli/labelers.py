"""Scripted labelers: rank the server's candidates by a stated preference, as a user would.

A `Labeler` asks for K candidates through the public API (`compare`), orders them by a
`Preference` over the response text, and submits the ranking (`rank`). They drive the loop in
demos, end-to-end tests and load runs; the server cannot tell them from people.

    with FlywheelClient("127.0.0.1:50051") as client:
        labeler = Labeler(client, preference_from_spec("correct"), name="sim-correct")
        stats = labeler.run(demo_prompts(seed=0), count=100)

Built-in preferences (`preference_from_spec`): `correct` (the demo task's checker), `incorrect`
(its opposite), `shorter`, `longer` (character length) and `contains:WORD` (case-sensitive
substring).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, Unpack

from flywheel_client import types as t
from flywheel_client.errors import (
    FlywheelError,
    InvalidArgument,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)
from flywheel_client.ranking import RankingArg, Tiers

Messages = Sequence[Mapping[str, str]]
Prompt = str | Messages
R = TypeVar("R")

# -- preferences ---------------------------------------------------------------------------------


class Preference(Protocol):
    """A stated preference over responses: a higher key is better, equal keys tie."""

    def key(self, prompt: str, response: str) -> float: ...


@dataclass(frozen=True)
class Correct:
    """1 for the demo task's correct answer, 0 for a wrong one.

    A prompt with no demo instruction raises ValueError rather than scoring 0: every candidate
    would tie and the labeler would silently skip everything, which hides the misconfiguration.
    """

    def key(self, prompt: str, response: str) -> float:
        from flywheel_demo.task import TASKS, check  # stdlib only; keeps torch out

        verdict = check(prompt, response)
        if verdict is None:
            raise ValueError(
                f"preference 'correct' needs a demo-task instruction in the prompt "
                f"({', '.join(f'{task}: ...' for task in TASKS)}), got {prompt[:80]!r}"
            )
        return 1.0 if verdict else 0.0

    def __str__(self) -> str:
        return "correct"


@dataclass(frozen=True)
class Incorrect:
    """1 for a wrong answer to the demo task, 0 for the right one: the opposite of `correct`,
    and of what the demo's initial reward model learned, so a loop that only amplifies its
    prior cannot satisfy it."""

    def key(self, prompt: str, response: str) -> float:
        return 1.0 - Correct().key(prompt, response)

    def __str__(self) -> str:
        return "incorrect"


@dataclass(frozen=True)
class Shorter:
    def key(self, prompt: str, response: str) -> float:
        return -float(len(response))

    def __str__(self) -> str:
        return "shorter"


@dataclass(frozen=True)
class Longer:
    def key(self, prompt: str, response: str) -> float:
        return float(len(response))

    def __str__(self) -> str:
        return "longer"


@dataclass(frozen=True)
class Contains:
    """1 if `word` occurs in the response (case-sensitive substring), else 0."""

    word: str

    def __post_init__(self) -> None:
        if not self.word:
            raise ValueError("contains needs a word to look for, as in contains:yes")

    def key(self, prompt: str, response: str) -> float:
        return 1.0 if self.word in response else 0.0

    def __str__(self) -> str:
        return f"contains:{self.word}"


PREFERENCE_SPECS = ("correct", "incorrect", "shorter", "longer", "contains:WORD")


def preference_from_spec(spec: str) -> Preference:
    """`correct`, `incorrect`, `shorter`, `longer` or `contains:WORD` -> that preference."""
    name, colon, argument = spec.strip().partition(":")
    name = name.strip().lower()
    simple: dict[str, Preference] = {
        "correct": Correct(), "incorrect": Incorrect(), "shorter": Shorter(), "longer": Longer(),
    }  # fmt: skip
    if name in simple and not colon:
        return simple[name]
    if name == "contains":
        if not argument:
            raise ValueError(f"contains needs a word to look for, as in contains:yes; got {spec!r}")
        return Contains(argument)
    if name in simple:
        raise ValueError(f"preference {name!r} takes no argument, got {spec!r}")
    raise ValueError(f"unknown preference {spec!r}; choose one of {', '.join(PREFERENCE_SPECS)}")


# -- rankings ------------------------------------------------------------------------------------


def tiers_by_key(ids: Sequence[str], keys: Sequence[float]) -> Tiers:
    """Ids grouped into tiers by key, best (highest) first; equal keys share a tier."""
    if len(ids) != len(keys):
        raise ValueError(f"got {len(ids)} ids but {len(keys)} keys")
    groups: dict[float, list[str]] = {}
    for cid, key in zip(ids, keys, strict=True):
        groups.setdefault(key, []).append(cid)
    return tuple(tuple(groups[key]) for key in sorted(groups, reverse=True))


def prompt_text(prompt: Prompt) -> str:
    """The text a preference judges: the prompt itself, or a chat's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") or "" for m in prompt if m.get("role") == "user"]
    if users:
        return users[-1]
    return "\n".join(m.get("content") or "" for m in prompt)


def idempotency_key(labeler: str, prompt_id: str) -> str:
    # One ranking per labeler per comparison: a retried submission reuses the key, so the
    # server stores it once even if the first attempt landed and only its answer was lost.
    return f"{labeler}:{prompt_id}"


def demo_prompts(seed: int | None = 0, task: str | None = None) -> Iterator[list[dict[str, str]]]:
    """An endless stream of demo-task instructions as one-message chats (None: a fresh seed)."""
    from flywheel_demo.task import sample_example  # stdlib only; keeps torch out

    rng = random.Random(seed)
    while True:
        yield [{"role": "user", "content": sample_example(rng, task).instruction}]


# -- the labeler ---------------------------------------------------------------------------------


# The same for every prompt: counting them and going on would only repeat them.
FATAL = (InvalidArgument, Unauthenticated, PermissionDenied)


class RankingClient(Protocol):
    """What a labeler needs of a client; `FlywheelClient` provides it."""

    def compare(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        k: int = 4,
        policies: Sequence[str] = (),
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Comparison: ...

    def rank(
        self, ranking: RankingArg, *, labeler: str, idempotency_key: str | None = None
    ) -> t.RankingReceipt: ...


@dataclass(frozen=True)
class LabelResult:
    """One comparison: the candidates' keys (in candidate order), the tiers of ids best first,
    and the server's receipt, or None when every candidate tied and nothing was submitted."""

    prompt_id: str
    tiers: Tiers
    keys: tuple[float, ...]
    receipt: t.RankingReceipt | None

    @property
    def skipped(self) -> bool:
        return self.receipt is None


@dataclass(frozen=True)
class LabelStats:
    """Counts over a run. `attempts` = submitted + skipped + errors.

    `mean_key` is the mean preference key over all candidates seen: for `correct`, the share
    of the policy's samples that were right, so it rises as the policy learns.
    """

    submitted: int = 0
    skipped: int = 0  # every candidate tied: no information to submit
    errors: int = 0
    duplicates: int = 0  # receipts the server marked as already recorded
    pairs: int = 0
    retries: int = 0  # Overloaded answers retried after a backoff
    candidates: int = 0
    key_sum: float = 0.0
    seconds: float = 0.0
    last_error: str | None = None

    @property
    def attempts(self) -> int:
        return self.submitted + self.skipped + self.errors

    @property
    def mean_key(self) -> float:
        return self.key_sum / self.candidates if self.candidates else float("nan")


class Labeler:
    """Ranks K candidates per prompt by `preference` and submits the ranking as `name` ("": the
    server records the API key's name, and refuses it when auth is off).

    Overloaded answers are retried up to `retries` times with exponential backoff from
    `backoff` seconds, or the server's Retry-After when longer (a retried ranking reuses its
    idempotency key). Errors no other prompt
    would avoid (`FATAL`: bad arguments such as max_tokens over the server's limit, a missing
    or weak API key) and exceptions raised by the preference itself propagate at once. Other
    server errors are counted, and `max_consecutive_errors` of them in a row end the run by
    re-raising the last (the server is refusing everything).
    """

    def __init__(
        self,
        client: RankingClient,
        preference: Preference,
        *,
        name: str,
        k: int = 4,
        policies: Sequence[str] = (),
        retries: int = 5,
        backoff: float = 0.1,
        max_consecutive_errors: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        **sampling: Unpack[t.SamplingOptions],
    ) -> None:
        if k < 2:
            raise ValueError(f"k must be at least 2 to rank candidates, got {k}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        if backoff < 0:
            raise ValueError(f"backoff must be 0 or more seconds, got {backoff}")
        if max_consecutive_errors < 1:
            raise ValueError(
                f"max_consecutive_errors must be at least 1, got {max_consecutive_errors}"
            )
        self.client = client
        self.preference = preference
        self.name = name
        self.k = k
        self.policies = tuple(policies)
        self.retries = retries
        self.backoff = backoff
        self.max_consecutive_errors = max_consecutive_errors
        self.sampling = sampling
        self._sleep = sleep
        self._clock = clock
        self._retried = 0

    def label_once(self, prompt: Prompt, *, deadline: float | None = None) -> LabelResult:
        """Compare, rank by the preference, submit (unless every candidate tied)."""
        text_prompt = prompt if isinstance(prompt, str) else None
        messages = None if isinstance(prompt, str) else prompt
        comparison = self._retrying(
            lambda: self.client.compare(
                text_prompt, messages=messages, k=self.k, policies=self.policies, **self.sampling
            ),
            deadline,
        )
        judged = prompt_text(prompt)
        candidates = comparison.candidates
        keys = tuple(_finite(self.preference.key(judged, c.text)) for c in candidates)
        tiers = tiers_by_key([c.id for c in candidates], keys)
        if len(tiers) < 2:
            return LabelResult(comparison.prompt_id, tiers, keys, None)
        key = idempotency_key(self.name, comparison.prompt_id)
        receipt = self._retrying(
            lambda: self.client.rank(tiers, labeler=self.name, idempotency_key=key), deadline
        )
        return LabelResult(comparison.prompt_id, tiers, keys, receipt)

    def run(
        self,
        prompts: Iterable[Prompt],
        *,
        count: int | None = None,
        seconds: float | None = None,
        on_result: Callable[[LabelStats], None] | None = None,
    ) -> LabelStats:
        """Label prompts until `count` attempts, `seconds` elapsed, or the prompts run out.

        At least one of `count` and `seconds` is required: a labeler never runs unbounded.
        `on_result` is called with the running totals after every attempt (for progress bars).
        """
        if count is None and seconds is None:
            raise ValueError("give count or seconds (or both); a labeler never runs unbounded")
        if count is not None and count < 0:
            raise ValueError(f"count must be 0 or more, got {count}")
        if seconds is not None and seconds < 0:
            raise ValueError(f"seconds must be 0 or more, got {seconds}")
        start = self._clock()
        deadline = None if seconds is None else start + seconds
        stats = LabelStats()
        consecutive = 0
        self._retried = 0
        for prompt in prompts:
            if count is not None and stats.attempts >= count:
                break
            if deadline is not None and self._clock() >= deadline:
                break
            try:
                result = self.label_once(prompt, deadline=deadline)
            except FATAL:
                raise
            except FlywheelError as e:
                consecutive += 1
                stats = dataclasses.replace(stats, errors=stats.errors + 1, last_error=str(e))
                if consecutive >= self.max_consecutive_errors:
                    raise
            else:
                consecutive = 0
                stats = _add(stats, result)
            stats = dataclasses.replace(stats, retries=self._retried, seconds=self._clock() - start)
            if on_result is not None:
                on_result(stats)
        return dataclasses.replace(stats, retries=self._retried, seconds=self._clock() - start)

    def _retrying(self, call: Callable[[], R], deadline: float | None) -> R:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Overloaded as e:
                wait = max(delay, e.retry_after or 0.0)  # the server's Retry-After, if longer
                out_of_time = deadline is not None and self._clock() + wait > deadline
                if attempt == self.retries or out_of_time:
                    raise
            self._retried += 1
            self._sleep(wait)
            delay *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")


def _finite(key: float) -> float:
    key = float(key)
    if not math.isfinite(key):
        raise ValueError(f"a preference key must be a finite number, got {key}")
    return key


def _add(stats: LabelStats, result: LabelResult) -> LabelStats:
    receipt = result.receipt
    return dataclasses.replace(
        stats,
        submitted=stats.submitted + (receipt is not None),
        skipped=stats.skipped + (receipt is None),
        duplicates=stats.duplicates + (receipt is not None and receipt.duplicate),
        pairs=stats.pairs + (receipt.pairs if receipt is not None else 0),
        candidates=stats.candidates + len(result.keys),
        key_sum=stats.key_sum + sum(result.keys),
    )
