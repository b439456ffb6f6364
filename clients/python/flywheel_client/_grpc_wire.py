"""Python arguments -> flywheel.v1 requests, and responses -> `flywheel_client.types`.

Shared by the sync and async gRPC clients so the two differ only in how they call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from flywheel_client import types as t
from flywheel_client.errors import InvalidArgument
from flywheel_client.ranking import Tiers
from flywheel_proto.v1 import flywheel_pb2 as pb

Messages = Sequence[Mapping[str, str]]


def prompt(text: str | None, messages: Messages | None) -> pb.Prompt:
    if (text is None) == (messages is None):
        raise InvalidArgument(
            "give either a prompt or messages, not both or neither", field="prompt"
        )
    if messages is not None:
        return pb.Prompt(
            chat=pb.Chat(
                messages=[
                    pb.ChatMessage(role=m.get("role", ""), content=m.get("content") or "")
                    for m in messages
                ]
            )
        )
    return pb.Prompt(text=text)


def sampling(
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    min_tokens: int | None = None,
    ignore_eos: bool | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
    logprobs: int | None = None,
) -> pb.SamplingParams:
    """Only the fields given are set, so the server's defaults apply to the rest."""
    params = pb.SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_tokens=max_tokens,
        seed=seed,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=dict(logit_bias or {}),
        logprobs=logprobs,
    )
    if stop is not None:
        params.stop.extend([stop] if isinstance(stop, str) else stop)
    return params


def generate_request(
    text: str | None, messages: Messages | None, n: int, policy: str, options: t.SamplingOptions
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt(text, messages), n=n, sampling=sampling(**options), policy=policy
    )


def compare_request(
    text: str | None,
    messages: Messages | None,
    k: int,
    policies: Sequence[str],
    options: t.SamplingOptions,
) -> pb.CompareRequest:
    return pb.CompareRequest(
        prompt=prompt(text, messages), k=k, sampling=sampling(**options), policies=list(policies)
    )


def ranking_request(tiers: Tiers, labeler: str, idempotency_key: str) -> pb.RankingRequest:
    return pb.RankingRequest(
        ranking=[pb.RankTier(completion_ids=tier) for tier in tiers],
        labeler=labeler,
        idempotency_key=idempotency_key,
    )


def completion(c: pb.Completion) -> t.Completion:
    return t.Completion(
        id=c.id,
        index=c.index,
        text=c.text,
        finish_reason=c.finish_reason,
        policy=c.policy,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        logprobs=logprobs(c.logprobs),
    )


def logprobs(entries: Iterable[pb.TokenLogprob]) -> tuple[t.TokenLogprob, ...]:
    return tuple(
        t.TokenLogprob(e.token, e.logprob, tuple((x.token, x.logprob) for x in e.top))
        for e in entries
    )


def generation(r: pb.GenerateResponse) -> t.Generation:
    return t.Generation(prompt_id=r.prompt_id, completions=tuple(map(completion, r.completions)))


def chunk(c: pb.GenerateChunk) -> t.Chunk:
    return t.Chunk(
        prompt_id=c.prompt_id,
        completion_id=c.completion_id,
        index=c.index,
        delta=c.delta,
        finish_reason=c.finish_reason,
        policy=c.policy,
        logprobs=logprobs(c.logprobs),
    )


def comparison(r: pb.CompareResponse) -> t.Comparison:
    return t.Comparison(prompt_id=r.prompt_id, candidates=tuple(map(completion, r.candidates)))


def scores(r: pb.ScoreResponse) -> t.Scores:
    return t.Scores(scores=tuple(r.scores), reward_model=r.reward_model)


def ranking_receipt(r: pb.RankingResponse) -> t.RankingReceipt:
    return t.RankingReceipt(
        ranking_id=r.ranking_id, prompt_id=r.prompt_id, pairs=r.pairs, duplicate=r.duplicate
    )


def demonstration_receipt(r: pb.DemonstrationResponse) -> t.DemonstrationReceipt:
    return t.DemonstrationReceipt(demonstration_id=r.demonstration_id, duplicate=r.duplicate)


def adapter_version(v: pb.AdapterVersion) -> t.AdapterVersion:
    return t.AdapterVersion(
        id=v.id,
        name=v.name,
        version=v.version,
        state=v.state,
        sha256=v.sha256,
        created_at=v.created_at,
        metrics=dict(v.metrics),
        base_model=v.base_model,
    )


def challenge_tally(c: pb.ChallengeTally) -> t.ChallengeTally:
    return t.ChallengeTally(
        challenger=c.challenger,
        champion=c.champion,
        outcome=c.outcome,
        rankings=c.rankings,
        wins=c.wins,
        losses=c.losses,
        ties=c.ties,
        win_rate=c.win_rate,
        lower=c.lower,
        upper=c.upper,
        share=c.share,
        confidence=c.confidence,
        promote_above=c.promote_above,
        retire_below=c.retire_below,
        min_rankings=c.min_rankings,
        started_at=c.started_at,
        ended_at=c.ended_at or None,
    )


def versions(r: pb.ListVersionsResponse) -> t.Versions:
    return t.Versions(
        versions=tuple(map(adapter_version, r.versions)),
        live=dict(r.live),
        challenge=challenge_tally(r.challenge) if r.HasField("challenge") else None,
    )


def ranking_record(r: pb.RankingRecord) -> t.RankingRecord:
    return t.RankingRecord(
        cursor=r.cursor,
        ranking_id=r.ranking_id,
        prompt_id=r.prompt_id,
        prompt=r.prompt,
        completions=tuple(
            t.RankedCompletion(
                completion_id=c.completion_id, text=c.text, policy=c.policy, tier=c.tier
            )
            for c in r.completions
        ),
        labeler=r.labeler,
        created_at=r.created_at,
        user=r.user,
        messages=tuple({"role": m.role, "content": m.content} for m in r.chat.messages),
    )


def prompt_record(r: pb.PromptRecord) -> t.PromptRecord:
    return t.PromptRecord(
        cursor=r.cursor,
        prompt_id=r.prompt_id,
        prompt=r.prompt,
        created_at=r.created_at,
        user=r.user,
    )


def demonstration_record(r: pb.DemonstrationRecord) -> t.DemonstrationRecord:
    return t.DemonstrationRecord(
        cursor=r.cursor,
        demonstration_id=r.demonstration_id,
        prompt=r.prompt,
        response=r.response,
        labeler=r.labeler,
        created_at=r.created_at,
    )


def server_info(r: pb.ServerInfo) -> t.ServerInfo:
    return t.ServerInfo(
        base_model=r.base_model,
        model_path=r.model_path,
        max_tokens_limit=r.max_tokens_limit,
        live=dict(r.live),
    )


def audit_record(r: pb.AuditRecord) -> t.AuditRecord:
    return t.AuditRecord(r.cursor, r.at, r.actor, r.action, r.target, r.detail)
