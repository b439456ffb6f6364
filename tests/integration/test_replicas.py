"""Two `flywheel serve` replicas sharing one PostgreSQL database and one adapter directory
behave as one service."""

from __future__ import annotations

import time

import pytest

from flywheel_client import FlywheelClient
from flywheel_model import loading
from tests.support import ServerProcess, make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_two_replicas_act_as_one(tiny_model, tmp_path, database):
    args = ["--db", database, "--sync-interval", "1"]
    a = ServerProcess(tiny_model, tmp_path / "a", args=args).start()
    b = ServerProcess(tiny_model, tmp_path / "b", args=args).start()
    try:
        with FlywheelClient(a.grpc) as on_a, FlywheelClient(b.grpc) as on_b:
            # A completion issued by A is rankable on B: one store.
            generated = on_a.generate("reverse: abc", n=2, max_tokens=4)
            receipt = on_b.rank([c.id for c in generated.completions], labeler="replicas")
            assert receipt.prompt_id == generated.prompt_id

            # A version published and promoted on A goes live on B within a bounded time.
            adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=5)
            version = on_a.publish_adapter(
                adapter,
                name="policy",
                base_model=loading.base_fingerprint(tiny_model),
                promote=True,
            )
            for _ in range(150):
                if on_b.versions().live["policy"] == version.id:
                    break
                time.sleep(0.2)
            assert on_b.versions().live["policy"] == version.id
            assert on_b.generate("x", max_tokens=1).completions[0].policy == version.id

            # A rollback on B reaches A the same way.
            on_b.rollback("policy")
            for _ in range(150):
                if on_a.versions().live["policy"] == "policy-v0":
                    break
                time.sleep(0.2)
            assert on_a.versions().live["policy"] == "policy-v0"
    finally:
        a.stop()
        b.stop()
