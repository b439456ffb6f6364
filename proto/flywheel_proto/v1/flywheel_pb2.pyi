from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "min_tokens", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    min_tokens: int
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., min_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., logprobs: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob", "token_id", "top")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    token_id: int
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ..., token_id: _Optional[int] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: Chat
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("id", "index", "text", "finish_reason", "policy", "prompt_tokens", "completion_tokens", "logprobs")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    text: str
    finish_reason: str
    policy: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., policy: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "n", "sampling", "policy", "user", "echo")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    n: int
    sampling: SamplingParams
    policy: str
    user: str
    echo: bool
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., n: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., policy: _Optional[str] = ..., user: _Optional[str] = ..., echo: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("prompt_id", "completions", "prompt_logprobs")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, prompt_id: _Optional[str] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("prompt_id", "completion_id", "index", "delta", "finish_reason", "policy", "logprobs", "prompt_logprobs")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    completion_id: str
    index: int
    delta: str
    finish_reason: str
    policy: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, prompt_id: _Optional[str] = ..., completion_id: _Optional[str] = ..., index: _Optional[int] = ..., delta: _Optional[str] = ..., finish_reason: _Optional[str] = ..., policy: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("prompt", "k", "sampling", "policies")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    k: int
    sampling: SamplingParams
    policies: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., policies: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("prompt_id", "candidates")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[Completion]
    def __init__(self, prompt_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("prompt", "completions", "reward_model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completions: _containers.RepeatedScalarFieldContainer[str]
    reward_model: str
    def __init__(self, prompt: _Optional[str] = ..., completions: _Optional[_Iterable[str]] = ..., reward_model: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "reward_model")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    reward_model: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., reward_model: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AdapterVersion(_message.Message):
    __slots__ = ("name", "version", "id", "state", "sha256", "created_at", "metrics", "base_model")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    id: str
    state: str
    sha256: str
    created_at: float
    metrics: _containers.ScalarMap[str, float]
    base_model: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., id: _Optional[str] = ..., state: _Optional[str] = ..., sha256: _Optional[str] = ..., created_at: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., base_model: _Optional[str] = ...) -> None: ...

class ChallengeTally(_message.Message):
    __slots__ = ("challenger", "champion", "outcome", "rankings", "wins", "losses", "ties", "win_rate", "lower", "upper", "share", "confidence", "promote_above", "retire_below", "min_rankings", "started_at", "ended_at")
    CHALLENGER_FIELD_NUMBER: _ClassVar[int]
    CHAMPION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    RANKINGS_FIELD_NUMBER: _ClassVar[int]
    WINS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TIES_FIELD_NUMBER: _ClassVar[int]
    WIN_RATE_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_ABOVE_FIELD_NUMBER: _ClassVar[int]
    RETIRE_BELOW_FIELD_NUMBER: _ClassVar[int]
    MIN_RANKINGS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    challenger: str
    champion: str
    outcome: str
    rankings: int
    wins: int
    losses: int
    ties: int
    win_rate: float
    lower: float
    upper: float
    share: float
    confidence: float
    promote_above: float
    retire_below: float
    min_rankings: int
    started_at: float
    ended_at: float
    def __init__(self, challenger: _Optional[str] = ..., champion: _Optional[str] = ..., outcome: _Optional[str] = ..., rankings: _Optional[int] = ..., wins: _Optional[int] = ..., losses: _Optional[int] = ..., ties: _Optional[int] = ..., win_rate: _Optional[float] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., share: _Optional[float] = ..., confidence: _Optional[float] = ..., promote_above: _Optional[float] = ..., retire_below: _Optional[float] = ..., min_rankings: _Optional[int] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "live", "challenge")
    class LiveEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[AdapterVersion]
    live: _containers.ScalarMap[str, str]
    challenge: ChallengeTally
    def __init__(self, versions: _Optional[_Iterable[_Union[AdapterVersion, _Mapping]]] = ..., live: _Optional[_Mapping[str, str]] = ..., challenge: _Optional[_Union[ChallengeTally, _Mapping]] = ...) -> None: ...

class RankTier(_message.Message):
    __slots__ = ("completion_ids",)
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    completion_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, completion_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RankingRequest(_message.Message):
    __slots__ = ("ranking", "labeler", "idempotency_key")
    RANKING_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ranking: _containers.RepeatedCompositeFieldContainer[RankTier]
    labeler: str
    idempotency_key: str
    def __init__(self, ranking: _Optional[_Iterable[_Union[RankTier, _Mapping]]] = ..., labeler: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RankingResponse(_message.Message):
    __slots__ = ("ranking_id", "prompt_id", "pairs", "duplicate")
    RANKING_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ranking_id: str
    prompt_id: str
    pairs: int
    duplicate: bool
    def __init__(self, ranking_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., pairs: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class DemonstrationRequest(_message.Message):
    __slots__ = ("prompt", "response", "labeler", "idempotency_key")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    response: str
    labeler: str
    idempotency_key: str
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., response: _Optional[str] = ..., labeler: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class DemonstrationResponse(_message.Message):
    __slots__ = ("demonstration_id", "duplicate")
    DEMONSTRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    demonstration_id: str
    duplicate: bool
    def __init__(self, demonstration_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("after", "limit")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: int
    limit: int
    def __init__(self, after: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class RankedCompletion(_message.Message):
    __slots__ = ("completion_id", "text", "policy", "tier")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    text: str
    policy: str
    tier: int
    def __init__(self, completion_id: _Optional[str] = ..., text: _Optional[str] = ..., policy: _Optional[str] = ..., tier: _Optional[int] = ...) -> None: ...

class RankingRecord(_message.Message):
    __slots__ = ("cursor", "ranking_id", "prompt_id", "prompt", "completions", "labeler", "created_at", "user", "chat")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    RANKING_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    ranking_id: str
    prompt_id: str
    prompt: str
    completions: _containers.RepeatedCompositeFieldContainer[RankedCompletion]
    labeler: str
    created_at: float
    user: str
    chat: Chat
    def __init__(self, cursor: _Optional[int] = ..., ranking_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt: _Optional[str] = ..., completions: _Optional[_Iterable[_Union[RankedCompletion, _Mapping]]] = ..., labeler: _Optional[str] = ..., created_at: _Optional[float] = ..., user: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ...) -> None: ...

class PromptRecord(_message.Message):
    __slots__ = ("cursor", "prompt_id", "prompt", "created_at", "user")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    prompt_id: str
    prompt: str
    created_at: float
    user: str
    def __init__(self, cursor: _Optional[int] = ..., prompt_id: _Optional[str] = ..., prompt: _Optional[str] = ..., created_at: _Optional[float] = ..., user: _Optional[str] = ...) -> None: ...

class DemonstrationRecord(_message.Message):
    __slots__ = ("cursor", "demonstration_id", "prompt", "response", "labeler", "created_at")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    demonstration_id: str
    prompt: str
    response: str
    labeler: str
    created_at: float
    def __init__(self, cursor: _Optional[int] = ..., demonstration_id: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., labeler: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("cursor", "at", "actor", "action", "target", "detail")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    at: float
    actor: str
    action: str
    target: str
    detail: str
    def __init__(self, cursor: _Optional[int] = ..., at: _Optional[float] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class AdapterHeader(_message.Message):
    __slots__ = ("name", "base_model", "sha256", "size", "metrics", "promote", "challenger")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGER_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_model: str
    sha256: str
    size: int
    metrics: _containers.ScalarMap[str, float]
    promote: bool
    challenger: bool
    def __init__(self, name: _Optional[str] = ..., base_model: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., promote: _Optional[bool] = ..., challenger: _Optional[bool] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: AdapterHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[AdapterHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ("version", "stop")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    version: int
    stop: bool
    def __init__(self, version: _Optional[int] = ..., stop: _Optional[bool] = ...) -> None: ...

class AddPromptsRequest(_message.Message):
    __slots__ = ("prompts",)
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ...) -> None: ...

class AddPromptsResponse(_message.Message):
    __slots__ = ("added", "duplicates")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    added: int
    duplicates: int
    def __init__(self, added: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("base_model", "model_path", "max_tokens_limit", "live")
    class LiveEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    model_path: str
    max_tokens_limit: int
    live: _containers.ScalarMap[str, str]
    def __init__(self, base_model: _Optional[str] = ..., model_path: _Optional[str] = ..., max_tokens_limit: _Optional[int] = ..., live: _Optional[_Mapping[str, str]] = ...) -> None: ...
