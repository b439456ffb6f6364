"""The labeling queue as people use it (the page under /ui/, and its JSON routes).

A labeler asks for a task and gets a prompt with K candidates from comparison sampling (the live
policy, or a blind champion / challenger mix while a challenge runs), shuffled. Their ranking
goes through the ordinary feedback route; a ranking of the claim's candidates by its labeler
completes the claim (`store.tasks.finish_claim`). Prompts come from a file the operator loads,
from a labeler who types one, or, when nothing else is open, from logged traffic: a random
sample of the newest distinct prompts, one task per prompt, so no prompt floods the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from flywheel_server import validation
from flywheel_server.domain import Claim, TaskSource
from flywheel_server.errors import InvalidRequest
from flywheel_server.generation import PromptInput
from flywheel_server.store.tasks import new_task

if TYPE_CHECKING:
    from flywheel_server.service import FlywheelService

REFILL = 20  # traffic prompts queued when a labeler finds nothing open
MAX_PROMPTS = 1000  # prompts one request may add
DAY_S = 86400.0


@dataclass(frozen=True)
class LabelingTask:
    claim: Claim
    candidates: list[tuple[str, str]]  # (completion id, text), in the order to show
    ranked_today: int


class Labeling:
    def __init__(
        self,
        service: FlywheelService,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.store = service.store
        self.config = service.config
        self._rng = rng or random.Random()
        self._clock = clock

    async def next(self, labeler: str, task_id: str = "") -> LabelingTask | None:
        """The labeler's reserved task, else the oldest open one (refilled from traffic when
        none is), with its candidates; None when there is nothing to label."""
        labeler = validation.label("labeler", labeler)
        claim = await self._claim(labeler, task_id)
        if claim is None and not task_id:
            await self._refill()
            claim = await self._claim(labeler, task_id)
        if claim is None:
            return None
        prompt_id = claim.prompt_id
        if prompt_id is None:
            task = claim.task
            prompt = (
                PromptInput(messages=[{"role": "user", "content": task.text}])
                if task.kind == "chat"
                else PromptInput(task.text)
            )
            generation = await self.service.compare(
                prompt, k=self.config.task_candidates, sampling=validation.RawSampling()
            )
            prompt_id = await asyncio.to_thread(
                self.store.set_claim_prompt, task.id, labeler, generation.prompt_id
            )
            claim = dataclasses.replace(claim, prompt_id=prompt_id)
        shown = await asyncio.to_thread(self.store.comparison, prompt_id)
        candidates = [(c.id, c.text) for c in shown]
        # Blind and shuffled, the same order on a reload, another for each labeler of a task.
        random.Random(f"{prompt_id}/{labeler}").shuffle(candidates)
        today = await asyncio.to_thread(self.store.ranked_since, labeler, self._today())
        return LabelingTask(claim, candidates, today)

    async def add(self, texts: Sequence[str], source: TaskSource) -> int:
        """Queue prompts (user messages, rendered with the chat template); returns how many
        were new. Each goes to two labelers with probability `task_shared_share`."""
        if not texts:
            raise InvalidRequest("prompts must hold at least one prompt", field="prompts")
        if len(texts) > MAX_PROMPTS:
            raise InvalidRequest(f"at most {MAX_PROMPTS} prompts a request, got {len(texts)}",
                                 field="prompts")  # fmt: skip
        clean = [validation.text(f"prompts[{i}]", t) for i, t in enumerate(texts)]
        added = await asyncio.to_thread(
            self.store.add_tasks, [new_task(t, "chat", source, self._copies()) for t in clean]
        )
        return len(added)

    async def typed(self, labeler: str, text: str) -> LabelingTask | None:
        """A labeler's own prompt, queued and given to them at once."""
        clean = validation.text("prompt", text)
        task = new_task(clean, "chat", "typed", 1)
        added = await asyncio.to_thread(self.store.add_tasks, [task])
        if not added:
            raise InvalidRequest("this prompt is already queued; label it when it comes up",
                                 field="prompt")  # fmt: skip
        return await self.next(labeler, task.id)

    async def skip(self, labeler: str, task_id: str, all_bad: bool = False) -> Claim:
        labeler = validation.label("labeler", labeler)
        return await asyncio.to_thread(
            self.store.skip_task, task_id, labeler, self._clock(), all_bad
        )

    async def _claim(self, labeler: str, task_id: str) -> Claim | None:
        return await asyncio.to_thread(
            self.store.claim_task, labeler, self._clock(), self.config.task_hold_s, task_id
        )

    async def _refill(self) -> None:
        traffic = await asyncio.to_thread(self.store.traffic_prompts)
        chosen = self._rng.sample(traffic, min(REFILL, len(traffic)))
        kind: Literal["text"] = "text"  # logged prompts are kept as the policy saw them
        tasks = [new_task(text, kind, "traffic", self._copies()) for _, text in chosen]
        if tasks:
            await asyncio.to_thread(self.store.add_tasks, tasks)

    def _copies(self) -> int:
        return 2 if self._rng.random() < self.config.task_shared_share else 1

    def _today(self) -> float:
        now = self._clock()
        return now - now % DAY_S  # since midnight UTC
