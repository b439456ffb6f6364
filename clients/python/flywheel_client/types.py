"""Plain immutable values the clients return; both transports decode into these."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (before temperature, penalties and
    filters), and the most likely tokens at its place with theirs, best first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """One completion the server issued; `id` is what `rank` accepts."""

    id: str
    index: int
    text: str
    finish_reason: str  # "stop" | "length"
    policy: str  # the version that produced it, e.g. "policy-v3"; "" in a blind challenge mix
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # With the `logprobs` option: one per token sampled (the end of sequence's too).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Generation:
    prompt_id: str
    completions: tuple[Completion, ...]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


@dataclass(frozen=True)
class Chunk:
    """One streamed delta; the last chunk of each completion has `finish_reason` set."""

    prompt_id: str
    completion_id: str
    index: int
    delta: str
    finish_reason: str  # "" until the completion ends
    policy: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens behind delta (`logprobs` option)


@dataclass(frozen=True)
class Comparison:
    """K candidates for one prompt, for a labeler to rank."""

    prompt_id: str
    candidates: tuple[Completion, ...]


@dataclass(frozen=True)
class Scores:
    scores: tuple[float, ...]
    reward_model: str


@dataclass(frozen=True)
class RankingReceipt:
    ranking_id: str
    prompt_id: str
    pairs: int  # ordered (better, worse) pairs the ranking implies
    duplicate: bool  # the idempotency key was seen before; nothing new was stored


@dataclass(frozen=True)
class PromptsAdded:
    added: int  # queued for labelers
    duplicates: int  # already queued: not queued again


@dataclass(frozen=True)
class DemonstrationReceipt:
    demonstration_id: str
    duplicate: bool


@dataclass(frozen=True)
class AdapterVersion:
    id: str  # "policy-v3"
    name: str  # "policy" | "reward"
    version: int
    state: str  # "ready" | "live" | "retired" (also: lost a challenge) | "refused"
    sha256: str
    created_at: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    base_model: str = ""


@dataclass(frozen=True)
class ChallengeTally:
    """A challenger policy against the champion (the policy live when the challenge began),
    judged by labelers' rankings of blind comparisons between the two.

    Each ranking scores the mean over its (challenger, champion) pairs of 1 (challenger better),
    1/2 (tie) or 0; `wins`, `losses` and `ties` count rankings whose score is above, below or at
    1/2. `win_rate` is the mean score, [`lower`, `upper`] its Wilson interval at `confidence`.
    Once `rankings >= min_rankings`, lower > promote_above promotes the challenger and
    upper < retire_below retires it.
    """

    challenger: str  # "policy-v4"
    champion: str  # "policy-v3"
    outcome: str  # "running" | "promoted" | "retired" | "stopped"
    rankings: int
    wins: int
    losses: int
    ties: int
    win_rate: float
    lower: float
    upper: float
    share: float  # of comparison requests that carry the challenge
    confidence: float
    promote_above: float
    retire_below: float
    min_rankings: int
    started_at: float
    ended_at: float | None = None  # None while running


@dataclass(frozen=True)
class Versions:
    versions: tuple[AdapterVersion, ...]
    live: Mapping[str, str]  # name -> live id, e.g. "policy" -> "policy-v3"
    challenge: ChallengeTally | None = None  # the running challenge, else the last that ended


@dataclass(frozen=True)
class RankedCompletion:
    completion_id: str
    text: str
    policy: str
    tier: int  # 0 = best


@dataclass(frozen=True)
class RankingRecord:
    cursor: int
    ranking_id: str
    prompt_id: str
    prompt: str  # the rendered prompt text the policy saw
    completions: tuple[RankedCompletion, ...]
    labeler: str
    created_at: float
    user: str = ""  # the end user the prompt was asked for (OpenAI's `user`)
    messages: tuple[dict[str, str], ...] = ()  # a chat prompt's messages, before the template


@dataclass(frozen=True)
class PromptRecord:
    cursor: int
    prompt_id: str
    prompt: str
    created_at: float
    user: str = ""


@dataclass(frozen=True)
class DemonstrationRecord:
    cursor: int
    demonstration_id: str
    prompt: str
    response: str
    labeler: str
    created_at: float


@dataclass(frozen=True)
class AuditRecord:
    """Who changed what (`actor`: the API key's name): see the server's `audit` module."""

    cursor: int
    at: float
    actor: str
    action: str
    target: str
    detail: str


@dataclass(frozen=True)
class ServerInfo:
    base_model: str  # the fingerprint adapter publishers must match
    model_path: str
    max_tokens_limit: int
    live: Mapping[str, str]


class SamplingOptions(TypedDict, total=False):
    """Keyword arguments every generation method accepts; unset ones take the server's defaults
    (temperature 1, top_p 1, top_k 0 = off, max_tokens 64; min_tokens 0 and ignore_eos off:
    no end of sequence before min_tokens tokens, or none at all, as benchmarks want)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: str | Sequence[str]
    seed: int
    min_tokens: int
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[int, float]  # token id -> bias
    logprobs: int  # each token's log-probability, with this many alternatives (0 to 20)
