"""Adapter versions through the contract: publish, pin, promote, roll back, refuse."""

from __future__ import annotations

import json

import pytest

from flywheel_client import Conflict, FlywheelClient, InvalidArgument
from flywheel_model import adapters, loading
from tests.support import make_adapter

pytestmark = pytest.mark.integration


def greedy(client: FlywheelClient, policy: str) -> str:
    return (
        client.generate("reverse: flywheel", max_tokens=12, temperature=0, policy=policy)
        .completions[0]
        .text
    )


@pytest.mark.both_backends
def test_publish_pin_promote_rollback(server, tmp_path):
    base = loading.base_fingerprint(server.model)
    with FlywheelClient(server.grpc) as client:
        live_before = client.versions().live["policy"]  # the base, or what other tests promoted
        base_text = greedy(client, "policy")
        v = client.publish_adapter(
            make_adapter(server.model, tmp_path / "p", seed=1, scale=20.0),
            name="policy",
            base_model=base,
        )
        assert v.state == "ready" and v.id.startswith("policy-v")
        assert client.versions().live["policy"] == live_before  # published, not promoted
        pinned = greedy(client, v.id)
        assert pinned != base_text  # the adapter changes the policy
        assert greedy(client, "policy") == base_text

        live = client.promote("policy", v.version)
        assert live.state == "live" and client.versions().live["policy"] == v.id
        assert greedy(client, "policy") == pinned
        assert client.generate("x", max_tokens=1).completions[0].policy == v.id

        back = client.rollback("policy")
        assert back.id == "policy-v0" or back.version < v.version
        assert greedy(client, "policy") == base_text
        states = {x.id: x.state for x in client.versions("policy").versions}
        assert states[v.id] == "retired"


@pytest.mark.both_backends
def test_refused_adapters_store_nothing_live(server, tmp_path):
    base = loading.base_fingerprint(server.model)
    with FlywheelClient(server.grpc) as client:
        live_before = client.versions().live
        with pytest.raises(Conflict, match="base model"):
            client.publish_adapter(
                make_adapter(server.model, tmp_path / "a"),
                name="policy",
                base_model="not-this-base",
            )

        # A NaN adapter loads but fails its smoke check: recorded as refused, never live.
        from safetensors.torch import load_file, save_file

        bad = make_adapter(server.model, tmp_path / "nan", seed=2)
        weights = load_file(str(bad / adapters.ADAPTER_WEIGHTS))
        save_file(
            {k: v.fill_(float("nan")) for k, v in weights.items()},
            str(bad / adapters.ADAPTER_WEIGHTS),
        )
        with pytest.raises(Conflict, match="non-finite"):
            client.publish_adapter(bad, name="policy", base_model=base, promote=True)
        assert client.versions().live == live_before

        # Not a PEFT directory at all.
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        with pytest.raises(Conflict, match=r"adapter_model\.safetensors"):
            client.publish_adapter(tmp_path / "junk", name="policy", base_model=base)
        assert client.versions().live == live_before


def test_unknown_name_is_invalid(server, tiny_model, tmp_path):
    with (
        FlywheelClient(server.grpc) as client,
        pytest.raises(InvalidArgument, match="name must be one of"),
    ):
        client.publish_adapter(
            make_adapter(tiny_model, tmp_path / "x"), name="value", base_model="x"
        )
