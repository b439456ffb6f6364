"""Continuous batching: joining mid-flight, leaving early, per-row adapters, batch invariance."""

from __future__ import annotations

import asyncio

import pytest

from flywheel_server.domain import Sampling
from flywheel_server.engine_api import EngineRequest
from flywheel_server.torch_engine import TorchEngine
from tests.support import make_adapter

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPTS = ["reverse: abc", "add: 12 + 7", "sort: dcba", "capitalise: flywheel"]


@pytest.fixture(scope="module", params=["auto", "generic"])
def engine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """On both decoders: the lean Llama one (auto, for this model) and transformers' forward."""
    from flywheel_demo.model import build_tiny_model

    root = tmp_path_factory.mktemp("batching")
    model = build_tiny_model(root / "tiny", seed=0)
    engine = TorchEngine(model, device="cpu", max_pending=16, max_batch=16, decoder=request.param)
    engine.adapter_dir = make_adapter(model, root / "adapter", seed=3, scale=20.0)  # type: ignore[attr-defined]
    yield engine
    engine.close()


async def run(
    engine: TorchEngine,
    prompt: str,
    *,
    adapter: str | None = None,
    max_tokens: int = 12,
    n: int = 1,
    seed: int | None = None,
    temperature: float = 0.0,
) -> list[str]:
    texts = [""] * n
    request = EngineRequest(
        tuple(engine.encode(prompt)),
        n,
        Sampling(temperature=temperature, max_tokens=max_tokens, seed=seed),
        adapter,
    )
    async for event in engine.generate(request):
        texts[event.index] += event.delta
    return texts


async def settled(engine: TorchEngine) -> bool:
    """The scheduler drops finished rows right after their last event: give it a moment."""
    for _ in range(2000):
        if engine.load == {"admitted": 0, "waiting": 0, "rows": 0}:
            return True
        await asyncio.sleep(0.005)
    return False


async def test_outputs_do_not_depend_on_the_batch(engine):
    alone = [await run(engine, p) for p in PROMPTS]
    together = await asyncio.gather(*(run(engine, p) for p in PROMPTS))
    assert list(together) == alone
    sampled_alone = await run(engine, PROMPTS[0], n=3, seed=11, temperature=1.0)
    sampled_together = await asyncio.gather(
        run(engine, PROMPTS[0], n=3, seed=11, temperature=1.0),
        *(run(engine, p) for p in PROMPTS[1:]),
    )
    assert sampled_together[0] == sampled_alone


async def test_rows_with_different_adapters_share_a_batch(engine):
    await engine.load_adapter("policy-v1", engine.adapter_dir, reward=False)
    try:
        base_alone = await run(engine, PROMPTS[0])
        tuned_alone = await run(engine, PROMPTS[0], adapter="policy-v1")
        assert base_alone != tuned_alone
        both = await asyncio.gather(
            run(engine, PROMPTS[0]), run(engine, PROMPTS[0], adapter="policy-v1")
        )
        assert list(both) == [base_alone, tuned_alone]
    finally:
        await engine.unload_adapter("policy-v1")


async def test_a_late_short_request_finishes_before_a_long_one(engine):
    order: list[str] = []

    async def tagged(name: str, max_tokens: int) -> None:
        await run(engine, PROMPTS[1], max_tokens=max_tokens)
        order.append(name)

    long = asyncio.create_task(tagged("long", 120))
    while engine.load["rows"] == 0:  # the long request is decoding
        await asyncio.sleep(0.001)
    await tagged("short", 3)
    await long
    assert order == ["short", "long"]


async def test_closing_a_stream_frees_its_slot(engine):
    request = EngineRequest(
        tuple(engine.encode(PROMPTS[2])), 2, Sampling(temperature=1.0, max_tokens=200, seed=1), None
    )
    stream = engine.generate(request)
    await anext(stream)
    assert engine.load["admitted"] == 1
    await stream.aclose()
    assert await settled(engine)


async def test_more_rows_than_the_batch_wait_and_complete(engine):
    results = await asyncio.gather(
        *(run(engine, PROMPTS[i % 4], n=5, max_tokens=4) for i in range(6))
    )  # 30 rows > 16
    assert all(len(r) == 5 for r in results)
    assert await settled(engine)
