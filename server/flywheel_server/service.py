"""The service: every business rule of serving and feedback, behind both transports.

Transports convert wire <-> these calls; the service validates, asks the engine, and records in
the store. A request that fails validation stores nothing. Which adapter versions are loaded and
live is `lifecycle.AdapterLifecycle`'s (`service.adapters`); a running request is
`generation.GenerationStream`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

from flywheel_server import auth, metrics, validation
from flywheel_server import challenge as challenge_math
from flywheel_server.config import ServerConfig
from flywheel_server.domain import (
    AdapterVersion,
    AuditEntry,
    Demonstration,
    DemonstrationExport,
    DemonstrationReceipt,
    PromptExport,
    PromptRecord,
    Ranking,
    RankingExport,
    RankingReceipt,
    Sampling,
)
from flywheel_server.engine_api import Engine, check_admission
from flywheel_server.errors import FlywheelError, InvalidRequest, NotFound
from flywheel_server.generation import (
    Generation,
    GenerationStream,
    GroupCommit,
    PromptInput,
    Row,
    new_id,
)
from flywheel_server.labeling import Labeling
from flywheel_server.lifecycle import AdapterLifecycle
from flywheel_server.registry import AdapterRegistry
from flywheel_server.store import Store

log = logging.getLogger(__name__)

DEFAULT_K = 4
EXPORT_PAGE = 500


class FlywheelService:
    def __init__(self, engine: Engine, store: Store, config: ServerConfig) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        self.registry = AdapterRegistry(engine.base_model)
        self.adapters = AdapterLifecycle(engine, store, self.registry, config)
        # A request may not ask for more tokens than the model has positions for.
        self.max_tokens_limit = min(config.max_tokens_limit, engine.max_positions - 1)
        self.recorder = GroupCommit(store)
        # Spends the caller's token budget (`auth.Authenticator.charge`; the app sets it).
        self.charge: Callable[[str, int], None] = lambda caller, tokens: None
        self._rng = random.Random()  # seats of a challenge's candidates
        self.labeling = Labeling(self)

    # -- generation -------------------------------------------------------------------------

    def render(self, prompt: PromptInput) -> tuple[Literal["text", "chat"], str]:
        """(kind, prompt text the policy sees)."""
        given = [x is not None for x in (prompt.text, prompt.messages, prompt.token_ids)]
        if sum(given) != 1:
            raise InvalidRequest("give exactly one of prompt or messages", field="prompt")
        if prompt.token_ids is not None:
            ids = validation.token_ids("prompt", prompt.token_ids, self.engine.vocab_size)
            return "text", validation.printable(self.engine.decode(ids))
        if prompt.text is not None:
            return "text", validation.text("prompt", prompt.text)
        return "chat", self.engine.render_chat(validation.messages(prompt.messages))

    def _admit(self) -> None:
        """Refuse at capacity before any work (rendering, tokenising): a full server answers
        429 at once. The engine checks again when it admits the request, since others may
        have taken the last places in between."""
        check_admission(False, self.engine.load["admitted"], self.config.max_pending)

    def _encode_prompt(self, prompt: PromptInput, text: str, sampling: Sampling) -> tuple[int, ...]:
        ids = self.engine.encode(text) if prompt.token_ids is None else prompt.token_ids
        limit = min(self.config.max_prompt_tokens, self.engine.max_positions - sampling.max_tokens)
        if len(ids) > limit:
            raise InvalidRequest(
                f"prompt is {len(ids)} tokens; with max_tokens={sampling.max_tokens} at most {limit} fit",
                field="prompt",
            )
        return tuple(ids)

    def _sampling(self, raw: validation.RawSampling) -> Sampling:
        return validation.sampling(
            raw, max_tokens_limit=self.max_tokens_limit, vocab_size=self.engine.vocab_size
        )

    async def generate(
        self,
        prompt: PromptInput,
        *,
        n: int,
        sampling: validation.RawSampling,
        policy: str = "",
        user: str = "",
        score_prompt: bool = False,
    ) -> Generation:
        stream = self.generate_stream(
            prompt, n=n, sampling=sampling, policy=policy, user=user, score_prompt=score_prompt
        )
        return await stream.finish()

    def generate_stream(
        self,
        prompt: PromptInput,
        *,
        n: int,
        sampling: validation.RawSampling,
        policy: str = "",
        user: str = "",
        score_prompt: bool = False,
    ) -> GenerationStream:
        """Validate now (errors raise before any event), then stream as the caller iterates.
        `sampling` comes as the transport read it; the service checks it. `user`: the end user
        the caller asks for (OpenAI's field), stored with the prompt. `score_prompt`: the
        prompt's tokens' log-probabilities too (OpenAI's `echo`), in the stream's
        prompt_logprobs once its first events came."""
        self._admit()
        checked = self._sampling(sampling)
        n = validation.integer("n", n, 1, self.config.max_n)
        self.charge(auth.CALLER.get(), n * checked.max_tokens)
        kind, text = self.render(prompt)
        policy_id, adapter = self.registry.resolve(policy, kind="policy", field="policy")
        rows = [Row(new_id("cmpl"), i, policy_id, adapter) for i in range(n)]
        return GenerationStream(
            self.engine,
            self.registry,
            self.recorder,
            PromptRecord(new_id("prm"), text, kind, user=_user(user), messages=_chat(prompt)),
            self._encode_prompt(prompt, text, checked),
            checked,
            rows,
            score_prompt=score_prompt,
        )

    async def compare(
        self,
        prompt: PromptInput,
        *,
        k: int,
        sampling: validation.RawSampling,
        policies: Sequence[str] = (),
    ) -> Generation:
        """K candidates: candidate i from policies[i % len(policies)]; without policies, from the
        live policy, or (challenger_share of requests while a challenge runs) a blind mix of the
        challenger's and the champion's."""
        self._admit()
        checked = self._sampling(sampling)
        k = validation.integer("k", k or DEFAULT_K, 2, self.config.max_n)
        self.charge(auth.CALLER.get(), k * checked.max_tokens)
        kind, text = self.render(prompt)
        challenge = None if policies else self.adapters.draw_challenge()
        if challenge is None:
            chosen = [
                self.registry.resolve(p, kind="policy", field="policies")
                for p in (policies or [""])
            ]
            rows = [Row(new_id("cmpl"), i, *chosen[i % len(chosen)]) for i in range(k)]
        else:
            sides = {
                True: (challenge.challenger_id, challenge.challenger_id),
                False: self.registry.resolve(challenge.champion_id, kind="policy", field="policy"),
            }
            seats = challenge_math.challenger_seats(k, self._rng)
            rows = [Row(new_id("cmpl"), i, *sides[seat]) for i, seat in enumerate(seats)]
        stream = GenerationStream(
            self.engine,
            self.registry,
            self.recorder,
            PromptRecord(
                new_id("prm"),
                text,
                kind,
                challenge=None if challenge is None else challenge.seq,
                messages=_chat(prompt),
            ),
            self._encode_prompt(prompt, text, checked),
            checked,
            rows,
        )
        result = await stream.finish()
        if challenge is None:
            return result
        # Blind: the store keeps which candidate came from which version; the labeler sees none.
        return replace(result, completions=[replace(c, policy="") for c in result.completions])

    async def score(
        self, prompt: str, completions: Sequence[str], reward_model: str = ""
    ) -> tuple[list[float], str]:
        prompt = validation.text("prompt", prompt)
        if not completions:
            raise InvalidRequest("completions must hold at least one string", field="completions")
        validation.integer("completions", len(completions), 1, self.config.max_n * 4)
        for i, c in enumerate(completions):
            validation.text(f"completions[{i}]", c, allow_empty=True)
        reward_id, adapter = self.registry.resolve(
            reward_model, kind="reward", field="reward_model"
        )
        assert adapter is not None
        self.registry.acquire([adapter])
        try:
            return await self.engine.score(adapter, prompt, list(completions)), reward_id
        finally:
            self.registry.release([adapter])

    # -- feedback ---------------------------------------------------------------------------

    async def rank(
        self, tiers: Sequence[Sequence[str]], *, labeler: str, idempotency_key: str = ""
    ) -> RankingReceipt:
        labeler = validation.label("labeler", labeler)
        key = (
            validation.label("idempotency_key", idempotency_key)
            if idempotency_key
            else new_id("key")
        )
        clean = validation.ranking(tiers)
        ranking = Ranking(clean, labeler, key)
        found = await asyncio.to_thread(self.store.get_completions, ranking.ids)
        unknown = [cid for cid in ranking.ids if cid not in found]
        if unknown:
            raise NotFound(
                f"unknown completion id(s): {', '.join(unknown)}; only ids this service issued can be ranked",
                field="ranking",
            )
        prompts = {c.prompt_id for c in found.values()}
        if len(prompts) > 1:
            raise InvalidRequest(
                f"ranking mixes completions of {len(prompts)} different prompts; rank completions of one prompt",
                field="ranking",
            )
        receipt = await asyncio.to_thread(self.store.add_ranking, ranking, prompts.pop())
        metrics.ranked(receipt)
        if not receipt.duplicate:
            try:
                await self.adapters.judge_challenge(found.values())
            except FlywheelError as e:  # the ranking is stored; the next one judges again
                log.error("challenge not judged after %s: %s", receipt.ranking_id, e.message)
        return receipt

    async def demonstrate(
        self, prompt: PromptInput, response: str, *, labeler: str, idempotency_key: str = ""
    ) -> DemonstrationReceipt:
        _, text = self.render(prompt)
        demo = Demonstration(
            text,
            validation.text("response", response),
            validation.label("labeler", labeler),
            validation.label("idempotency_key", idempotency_key)
            if idempotency_key
            else new_id("key"),
        )
        receipt = await asyncio.to_thread(self.store.add_demonstration, demo)
        metrics.demonstrated(receipt)
        return receipt

    # -- learner-facing ---------------------------------------------------------------------

    def versions(self, name: str = "") -> tuple[list[AdapterVersion], dict[str, str]]:
        return self.registry.versions(name), self.registry.live()

    async def export_rankings(self, after: int, limit: int) -> list[RankingExport]:
        return await asyncio.to_thread(self.store.export_rankings, after, self._page(limit))

    async def export_prompts(self, after: int, limit: int) -> list[PromptExport]:
        return await asyncio.to_thread(self.store.export_prompts, after, self._page(limit))

    async def export_demonstrations(self, after: int, limit: int) -> list[DemonstrationExport]:
        return await asyncio.to_thread(self.store.export_demonstrations, after, self._page(limit))

    async def export_audit(self, after: int, limit: int) -> list[AuditEntry]:
        return await self.adapters.audit.export(after, self._page(limit))

    @staticmethod
    def _page(limit: int) -> int:
        return validation.integer("limit", limit or EXPORT_PAGE, 1, 10 * EXPORT_PAGE)


def _chat(prompt: PromptInput) -> list[dict[str, str]] | None:
    """A chat prompt's messages as stored (validated already by `render`)."""
    return None if prompt.messages is None else validation.messages(prompt.messages)


def _user(user: str) -> str:
    return validation.text("user", user, max_chars=validation.MAX_LABEL_CHARS, allow_empty=True)
