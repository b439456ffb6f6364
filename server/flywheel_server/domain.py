"""Plain values that cross the boundary between transports, the service, the engine and the store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from flywheel_server import challenge as challenge_math

FinishReason = Literal["stop", "length"]
AdapterState = Literal["ready", "live", "retired", "refused"]
ChallengeOutcome = Literal["running", "promoted", "retired", "stopped"]
ADAPTER_NAMES = ("policy", "reward")


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters (see service.validate_sampling for the bounds)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # As vLLM spells them, for benchmarks that need every answer to be max_tokens long: no end
    # of sequence before min_tokens tokens, or none at all (stop strings still stop).
    min_tokens: int = 0
    ignore_eos: bool = False
    # OpenAI's: subtract presence_penalty once from the logit of every token already generated,
    # frequency_penalty once per time it was; add logit_bias[token] to its logit.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Return each generated token's log-probability under the model (before temperature,
    # penalties and filters), with this many most likely alternatives; None: none.
    logprobs: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "seed": self.seed,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {str(t): b for t, b in self.logit_bias},
            "logprobs": self.logprobs,
        }

    def may_end(self, generated: int) -> bool:
        """Whether the end-of-sequence token may come after `generated` tokens."""
        return not self.ignore_eos and generated >= self.min_tokens


@dataclass(frozen=True)
class PromptRecord:
    id: str
    text: str  # the rendered text the policy saw
    kind: Literal["text", "chat"]
    created_at: float = field(default_factory=now)
    challenge: int | None = None  # the challenge whose blind comparison this prompt is
    user: str = ""  # OpenAI's `user`: the end user the caller says it asks for
    messages: list[dict[str, str]] | None = None  # a chat prompt's messages, before the template


@dataclass(frozen=True)
class CompletionRecord:
    id: str
    prompt_id: str
    index: int
    text: str
    finish_reason: FinishReason
    policy: str  # "policy-v3"
    sampling: Sampling
    prompt_tokens: int
    completion_tokens: int
    created_at: float = field(default_factory=now)


@dataclass(frozen=True)
class Ranking:
    """Tiers of completion ids, best first; ids within a tier are tied."""

    tiers: tuple[tuple[str, ...], ...]
    labeler: str
    idempotency_key: str

    @property
    def ids(self) -> list[str]:
        return [cid for tier in self.tiers for cid in tier]

    @property
    def pairs(self) -> int:
        """Ordered (better, worse) pairs implied by the tiers."""
        sizes = [len(t) for t in self.tiers]
        return sum(a * sum(sizes[i + 1 :]) for i, a in enumerate(sizes))


@dataclass(frozen=True)
class RankingReceipt:
    ranking_id: str
    prompt_id: str
    pairs: int
    duplicate: bool = False


@dataclass(frozen=True)
class Demonstration:
    prompt: str  # rendered
    response: str
    labeler: str
    idempotency_key: str


@dataclass(frozen=True)
class DemonstrationReceipt:
    demonstration_id: str
    duplicate: bool = False


@dataclass(frozen=True)
class RankedCompletion:
    completion_id: str
    text: str
    policy: str
    tier: int


@dataclass(frozen=True)
class RankingExport:
    cursor: int
    ranking_id: str
    prompt_id: str
    prompt: str
    completions: tuple[RankedCompletion, ...]
    labeler: str
    created_at: float
    user: str = ""  # of the prompt: the end user it was asked for
    messages: list[dict[str, str]] | None = None  # of a chat prompt, before the template


@dataclass(frozen=True)
class PromptExport:
    cursor: int
    prompt_id: str
    prompt: str
    created_at: float
    user: str = ""


@dataclass(frozen=True)
class AuditEntry:
    """Who changed what, and when (issue 18): see `audit`. cursor is 0 until stored."""

    actor: str
    action: str
    target: str
    detail: str = ""
    at: float = 0.0
    cursor: int = 0


@dataclass(frozen=True)
class DemonstrationExport:
    cursor: int
    demonstration_id: str
    prompt: str
    response: str
    labeler: str
    created_at: float


@dataclass(frozen=True)
class AdapterVersion:
    name: str  # "policy" | "reward"
    version: int
    state: AdapterState
    sha256: str
    path: str  # directory in standard PEFT format ("" for version 0, the bare base model)
    base_model: str
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=now)

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"


@dataclass(frozen=True)
class Challenge:
    """A challenger policy version against the champion, the version live when it began."""

    seq: int
    challenger: int  # policy version
    champion: int  # policy version; 0 = the bare base model
    outcome: ChallengeOutcome
    started_at: float
    ended_at: float | None = None

    @property
    def challenger_id(self) -> str:
        return f"policy-v{self.challenger}"

    @property
    def champion_id(self) -> str:
        return f"policy-v{self.champion}"


@dataclass(frozen=True)
class ChallengeStatus:
    """A challenge with its tally and the thresholds that judge it (what ListVersions shows)."""

    challenge: Challenge
    tally: challenge_math.Tally
    thresholds: challenge_math.Thresholds
    share: float


TaskSource = Literal["traffic", "file", "typed"]
ClaimState = Literal["reserved", "ranked", "skipped", "all_bad"]


@dataclass(frozen=True)
class Task:
    """A prompt waiting for labelers. chat: `text` is the user's message, rendered with the
    model's chat template; text: the raw prompt (logged traffic keeps what the policy saw)."""

    id: str
    text: str
    kind: Literal["text", "chat"]
    source: TaskSource
    copies: int = 1  # labelers who rank it: 2 for the share that measures agreement
    created_at: float = field(default_factory=now)


@dataclass(frozen=True)
class Claim:
    """A labeler's hold on a task. `prompt_id`: the comparison shown (None until sampled)."""

    task: Task
    labeler: str
    state: ClaimState
    reserved_until: float
    prompt_id: str | None = None
