"""The adapter registry as a scripted sequence, asserting its state after each step."""

from __future__ import annotations

import asyncio

import pytest

from flywheel_server.domain import AdapterVersion
from flywheel_server.errors import AdapterNotFound, Conflict, InvalidRequest
from flywheel_server.registry import AdapterRegistry, parse_id

pytestmark = pytest.mark.unit

BASE = "base-fingerprint"


def version(name: str, n: int, state: str = "ready") -> AdapterVersion:
    return AdapterVersion(name, n, state, f"sha-{name}-{n}", f"/adapters/{name}/v{n}", BASE)


def states(registry: AdapterRegistry, name: str = "") -> list[tuple[str, str]]:
    return [(v.id, v.state) for v in registry.versions(name)]


def resolve(
    registry: AdapterRegistry, requested: str, kind: str = "policy"
) -> tuple[str, str | None]:
    return registry.resolve(requested, kind=kind, field="model")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("policy", ("policy", None)),
        ("reward", ("reward", None)),
        ("policy-v0", ("policy", 0)),
        ("reward-v2", ("reward", 2)),
        ("policy-v123", ("policy", 123)),
    ],
)
def test_parse_id(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_id(text, field="model") == expected


@pytest.mark.parametrize(
    "text", ["gpt-4", "", "policy-v", "policy-3", "Policy", "policy-v1x", "value-v1"]
)
def test_parse_id_refuses_other_names(text: str) -> None:
    with pytest.raises(AdapterNotFound) as info:
        parse_id(text, field="model")
    assert info.value.field == "model"
    assert info.value.message.startswith(
        f"model {text!r} is not a model id: use 'policy', 'reward'"
    )


def test_scripted_sequence() -> None:
    r = AdapterRegistry(BASE)

    # Fresh: only the bare base model, live.
    assert r.base == AdapterVersion(
        "policy", 0, "ready", "", "", BASE, created_at=r.base.created_at
    )
    assert r.live() == {"policy": "policy-v0"}
    assert states(r) == [("policy-v0", "live")]
    assert resolve(r, "") == ("policy-v0", None)
    assert resolve(r, "policy") == ("policy-v0", None)
    assert resolve(r, "policy-v0") == ("policy-v0", None)
    with pytest.raises(Conflict) as conflict:
        resolve(r, "reward", kind="reward")
    assert conflict.value.field == "model"
    assert "no reward model is live yet" in conflict.value.message
    with pytest.raises(Conflict):
        resolve(r, "", kind="reward")

    # Add policy-v1: ready and addressable, but v0 stays live.
    v1 = version("policy", 1)
    r.add(v1)
    assert resolve(r, "policy-v1") == ("policy-v1", "policy-v1")
    assert resolve(r, "") == ("policy-v0", None)
    assert r.live() == {"policy": "policy-v0"}
    assert states(r) == [("policy-v0", "live"), ("policy-v1", "ready")]

    # Promote v1.
    r.set_live(v1)
    assert r.live() == {"policy": "policy-v1"}
    assert resolve(r, "") == ("policy-v1", "policy-v1")
    assert resolve(r, "policy") == ("policy-v1", "policy-v1")
    assert resolve(r, "policy-v0") == ("policy-v0", None)  # v0 is still addressable
    assert states(r) == [("policy-v0", "ready"), ("policy-v1", "live")]

    # Add and promote v2: v1 is no longer shown live.
    v2 = version("policy", 2)
    r.add(v2)
    assert states(r) == [("policy-v0", "ready"), ("policy-v1", "live"), ("policy-v2", "ready")]
    r.set_live(v2)
    assert r.live() == {"policy": "policy-v2"}
    assert resolve(r, "") == ("policy-v2", "policy-v2")
    assert states(r) == [("policy-v0", "ready"), ("policy-v1", "ready"), ("policy-v2", "live")]

    # Remove v2 (the live one): live falls back to the base, not to v1.
    r.remove("policy-v2")
    assert r.live() == {"policy": "policy-v0"}
    assert resolve(r, "") == ("policy-v0", None)
    assert states(r) == [("policy-v0", "live"), ("policy-v1", "ready")]
    with pytest.raises(AdapterNotFound):
        resolve(r, "policy-v2")

    # Removing an unknown id is a no-op.
    r.remove("policy-v7")
    assert states(r) == [("policy-v0", "live"), ("policy-v1", "ready")]

    # An unknown version names what is available.
    with pytest.raises(AdapterNotFound) as not_found:
        resolve(r, "policy-v9")
    assert not_found.value.field == "model"
    assert (
        not_found.value.message
        == "model 'policy-v9' is not loaded; available: policy-v0, policy-v1"
    )

    # Not a model id at all.
    with pytest.raises(AdapterNotFound) as bad_id:
        resolve(r, "gpt-4")
    assert "'gpt-4' is not a model id" in bad_id.value.message

    # A reward id where a policy is expected, and the other way round.
    with pytest.raises(InvalidRequest) as mismatch:
        resolve(r, "reward-v1", kind="policy")
    assert mismatch.value.field == "model"
    assert mismatch.value.message == "model must name a policy model, got 'reward-v1'"
    with pytest.raises(InvalidRequest, match="must name a reward model, got 'policy'"):
        resolve(r, "policy", kind="reward")

    # A reward model goes live alongside the policy.
    rm = version("reward", 1)
    r.set_live(rm)
    assert r.live() == {"policy": "policy-v0", "reward": "reward-v1"}
    assert resolve(r, "", kind="reward") == ("reward-v1", "reward-v1")
    assert states(r) == [("policy-v0", "live"), ("policy-v1", "ready"), ("reward-v1", "live")]
    assert states(r, "reward") == [("reward-v1", "live")]
    assert states(r, "policy") == [("policy-v0", "live"), ("policy-v1", "ready")]
    with pytest.raises(AdapterNotFound) as reward_missing:
        resolve(r, "reward-v2", kind="reward")
    assert reward_missing.value.message == "model 'reward-v2' is not loaded; available: reward-v1"


def test_versions_refuses_an_unknown_name() -> None:
    with pytest.raises(InvalidRequest) as info:
        AdapterRegistry(BASE).versions("value")
    assert info.value.field == "name"
    assert info.value.message == "name must be one of policy, reward, got 'value'"


def test_versions_sort_numerically() -> None:
    r = AdapterRegistry(BASE)
    for n in (10, 2, 1):
        r.add(version("policy", n))
    assert [v.id for v in r.versions()] == ["policy-v0", "policy-v1", "policy-v2", "policy-v10"]


def test_versions_does_not_mutate_the_stored_values() -> None:
    r = AdapterRegistry(BASE)
    v1 = version("policy", 1)
    r.set_live(v1)
    assert states(r) == [("policy-v0", "ready"), ("policy-v1", "live")]
    assert v1.state == "ready"
    assert r.base.state == "ready"


def test_a_version_stored_as_live_shows_retired_once_the_alias_moves_on() -> None:
    # store.promote hands back versions whose state is "live"; the alias, not that state, decides.
    r = AdapterRegistry(BASE)
    r.set_live(version("policy", 1, "live"))
    assert states(r) == [("policy-v0", "ready"), ("policy-v1", "live")]
    r.set_live(version("policy", 2, "live"))
    assert r.live() == {"policy": "policy-v2"}
    assert states(r) == [("policy-v0", "ready"), ("policy-v1", "retired"), ("policy-v2", "live")]


def test_refresh_takes_states_from_the_store_for_loaded_versions() -> None:
    r = AdapterRegistry(BASE)
    r.add(version("policy", 1))
    r.add(version("policy", 2))
    r.set_live(version("reward", 1))

    # The store says v2 is live and v1 retired; v3 is not loaded here and is ignored.
    stored = [
        version("policy", 1, "retired"),
        version("policy", 2, "live"),
        version("policy", 3, "live"),
    ]
    r.refresh("policy", stored)
    assert r.live() == {"policy": "policy-v2", "reward": "reward-v1"}
    assert states(r, "policy") == [
        ("policy-v0", "ready"),
        ("policy-v1", "retired"),
        ("policy-v2", "live"),
    ]
    assert resolve(r, "") == ("policy-v2", "policy-v2")
    with pytest.raises(AdapterNotFound):
        resolve(r, "policy-v3")

    # A rollback to the base: nothing stored is live, so policy-v0 serves again.
    r.refresh("policy", [version("policy", 1, "retired"), version("policy", 2, "retired")])
    assert r.live() == {"policy": "policy-v0", "reward": "reward-v1"}
    assert resolve(r, "") == ("policy-v0", None)
    assert states(r, "policy") == [
        ("policy-v0", "live"),
        ("policy-v1", "retired"),
        ("policy-v2", "retired"),
    ]
    # The other alias is untouched.
    assert states(r, "reward") == [("reward-v1", "live")]


async def test_a_version_is_idle_once_its_last_request_releases_it() -> None:
    reg = AdapterRegistry("base")
    reg.acquire(["policy-v1", "policy-v1", None])  # None: the base model, never counted
    assert reg.in_use("policy-v1") == 2
    waiting = asyncio.create_task(reg.idle("policy-v1"))
    reg.release(["policy-v1"])
    await asyncio.sleep(0)
    assert not waiting.done()  # one request still runs on it
    reg.acquire(["policy-v1"])  # a new one joins before the last leaves
    reg.release(["policy-v1", "policy-v1", None])
    await asyncio.wait_for(waiting, timeout=1)
    assert reg.in_use("policy-v1") == 0
    await asyncio.wait_for(reg.idle("policy-v1"), timeout=1)  # idle already: returns at once
