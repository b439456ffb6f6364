"""The whole loop: scripted labelers rank through the public API, one learner round publishes.

Runs against the session `server` fixture (tiny random model, a reward model live) with tiny
training settings; it leaves the live policy and reward model as it found them.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flywheel_cli.labelers import Labeler, demo_prompts, preference_from_spec
from flywheel_client import FlywheelClient
from flywheel_demo.task import pretraining_texts
from flywheel_learner import loop
from flywheel_learner import metrics as learner_metrics
from flywheel_learner.checkpoint import PendingPublish, load_state, save_state
from flywheel_learner.config import LearnerConfig
from flywheel_learner.gate import GateThresholds
from flywheel_learner.loop import Learner
from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.progress import Progress
from flywheel_learner.publishing import archive_sha256
from flywheel_learner.reward import RewardConfig
from tests.support import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def client(server: ServerProcess) -> Iterator[FlywheelClient]:
    with FlywheelClient(server.grpc, timeout=60) as c:
        live = dict(c.versions().live)
        yield c
        for name, version_id in live.items():  # other tests share the server: restore it
            for _ in range(20):
                if c.versions().live.get(name) == version_id:
                    break
                c.rollback(name)
            assert c.versions().live.get(name) == version_id


def tiny_config(server: ServerProcess, model: Path, work_dir: Path) -> LearnerConfig:
    corpus = work_dir / "pretraining.txt"  # the demo's kind of documents, for the ptx term
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(pretraining_texts(random.Random(0), 64)))
    return LearnerConfig(
        pretraining=corpus,
        server=server.grpc,
        model_dir=model,
        work_dir=work_dir,
        max_rounds=1,
        reward=RewardConfig(steps=4, r=4, batch_rankings=8, warmup=0, max_length=64, held_out=0.25),
        ppo=PPOConfig(
            rollout_batch=8,
            minibatches=2,
            epochs=1,
            max_new_tokens=8,
            ptx_batch=8,
            ptx_max_length=64,
            reward_max_length=64,
            lora_r=4,
            lora_alpha=8,
            beta=0.05,
            adaptive_kl=True,
            kl_horizon=16,
        ),
        ppo_steps_per_round=2,
        eval_prompts=4,
        # Wide open: this test checks the plumbing of promotion, not learning.
        gate=GateThresholds(
            min_reward_gain=-1e9,
            min_greedy_reward_gain=-1e9,
            max_kl=1e9,
            max_ptx_rise=1e9,
            min_judge_gain=-1e9,
            min_human_verdicts=10**9,
        ),
        rm_min_accuracy=0.0,
        rm_min_held_out_pairs=1,
        anchor_prompts=0,
    )


def label(client: FlywheelClient, name: str, seed: int) -> None:
    """Twelve `longer` rankings through the public API (at least 4 not all tied)."""
    torch.set_num_threads(1)
    labeler = Labeler(client, preference_from_spec("longer"), name=name, k=3, max_tokens=8)
    assert labeler.run(demo_prompts(seed=seed), count=12).submitted >= 4


def one_round(config: LearnerConfig) -> bool:
    learner = Learner(config, progress=Progress(tty=False))
    try:
        learner.sync()
        return learner.run_round()
    finally:
        learner.close()


def test_one_round_publishes_and_resume_does_not_duplicate(
    server: ServerProcess, tiny_model: Path, client: FlywheelClient, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    labeler = Labeler(client, preference_from_spec("longer"), name="e2e-longer", k=3, max_tokens=8)
    stats = labeler.run(demo_prompts(seed=7), count=20)
    assert stats.submitted >= 10, stats
    before = {v.id for v in client.versions().versions}
    sample = learner_metrics.REGISTRY.get_sample_value  # one registry per process: count deltas
    promoted = {"kind": "policy", "outcome": "promoted"}
    counted = {name: sample(name, labels) or 0.0 for name, labels in (
        ("flywheel_learner_rounds_total", None), ("flywheel_learner_versions_total", promoted),
        ("flywheel_learner_ppo_steps_total", None))}  # fmt: skip

    learner = Learner(tiny_config(server, tiny_model, tmp_path), progress=Progress(tty=False))
    try:
        assert learner.run() == 1
    finally:
        learner.close()

    versions = client.versions()
    new = [v for v in versions.versions if v.id not in before]
    reward = [v for v in new if v.name == "reward"]
    policy = [v for v in new if v.name == "policy"]
    assert len(reward) == 1 and len(policy) == 1, new
    assert {"held_out_accuracy", "train_loss", "rankings", "validated", "fresh_accuracy"} <= set(
        reward[0].metrics
    )
    assert {"reward_gain", "greedy_reward_gain", "kl_to_reference", "ptx_rise", "gate_passed",
            "judge_gain"} <= set(policy[0].metrics)  # fmt: skip
    assert policy[0].metrics["gate_passed"] == 1.0
    assert versions.live["policy"] == policy[0].id
    state = load_state(tmp_path)
    assert state.round == 1 and state.pending is None and state.rankings_cursor > 0
    assert state.kl_beta > 0 and state.kl_beta != 0.05  # the controller moved it; kept for next
    assert sample("flywheel_learner_rounds_total") == counted["flywheel_learner_rounds_total"] + 1
    assert (sample("flywheel_learner_versions_total", promoted)
            == counted["flywheel_learner_versions_total"] + 1)  # fmt: skip
    assert (
        sample("flywheel_learner_ppo_steps_total")
        == counted["flywheel_learner_ppo_steps_total"]
        + tiny_config(server, tiny_model, tmp_path).ppo_steps_per_round
    )
    assert 0 <= sample("flywheel_learner_reward_held_out_accuracy") <= 1
    for gauge in ("reward_train_loss", "ppo_reward_mean", "ppo_kl_nats", "ppo_ptx_loss"):
        assert sample(f"flywheel_learner_{gauge}") not in (None, 0.0), gauge  # set by the round
    assert 0 <= sample("flywheel_learner_ppo_clip_fraction") <= 1
    assert sample("flywheel_learner_peak_memory_bytes") > 50 << 20  # a process with torch

    # Killed after checkpointing the pending record but with the upload already landed:
    # a restarted learner finds the sha256 on the server and publishes nothing.
    directory = state.policy_dir
    pending = PendingPublish("policy", directory, archive_sha256(directory), {}, True)
    save_state(tmp_path, state.replace(pending=pending))
    count = len(client.versions().versions)
    restarted = Learner(tiny_config(server, tiny_model, tmp_path), progress=Progress(tty=False))
    try:
        restarted.recover()
    finally:
        restarted.close()
    assert len(client.versions().versions) == count
    assert load_state(tmp_path).pending is None


def test_a_candidate_the_gate_refuses_is_uploaded_but_not_live(
    server: ServerProcess,
    tiny_model: Path,
    client: FlywheelClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    label(client, "e2e-gate", seed=8)
    live = client.versions().live["policy"]
    sample = learner_metrics.REGISTRY.get_sample_value
    outcome = {"kind": "policy", "outcome": "refused"}
    refused = sample("flywheel_learner_versions_total", outcome) or 0.0
    closed = GateThresholds(min_reward_gain=1e9)  # no candidate can gain this much
    steps = sample("flywheel_learner_ppo_steps_total") or 0.0
    # The second rollout reads past kl_stop: the round's PPO ends there, 2 steps of 4.
    kls = iter([0.5, 99.0, 0.5, 0.5])
    real_step = loop.ppo_step
    monkeypatch.setattr(loop, "ppo_step", lambda *a: real_step(*a)._replace(kl_mean=next(kls)))
    config = dataclasses.replace(
        tiny_config(server, tiny_model, tmp_path), gate=closed, ppo_steps_per_round=4
    )
    assert one_round(config) is False
    assert sample("flywheel_learner_ppo_steps_total") - steps == 2
    versions = client.versions()
    assert versions.live["policy"] == live  # still the last good adapter
    newest = max((v for v in versions.versions if v.name == "policy"), key=lambda v: v.version)
    assert newest.metrics["gate_passed"] == 0.0 and newest.id != live
    assert sample("flywheel_learner_versions_total", outcome) == refused + 1


def test_a_round_whose_reward_model_fails_validation_publishes_no_policy(
    server: ServerProcess, tiny_model: Path, client: FlywheelClient, tmp_path: Path
) -> None:
    label(client, "e2e-rm", seed=9)
    before = client.versions()
    sample = learner_metrics.REGISTRY.get_sample_value
    skipped = sample("flywheel_learner_rounds_skipped_total") or 0.0
    unreachable = dataclasses.replace(
        tiny_config(server, tiny_model, tmp_path), rm_min_held_out_pairs=10**6
    )
    assert one_round(unreachable) is False
    after = client.versions()
    new = [v for v in after.versions if v.id not in {b.id for b in before.versions}]
    assert [v.name for v in new] == ["reward"], new  # the refit is shown; no policy
    assert new[0].state != "live" and new[0].metrics["validated"] == 0.0
    assert after.live == before.live
    assert sample("flywheel_learner_rounds_skipped_total") == skipped + 1
    assert load_state(tmp_path).round == 1


def test_no_policy_is_trained_before_the_human_anchor_has_prompts(
    server: ServerProcess,
    tiny_model: Path,
    client: FlywheelClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="flywheel.learner")
    label(client, "e2e-anchor", seed=11)
    before = client.versions()
    steps = learner_metrics.REGISTRY.get_sample_value("flywheel_learner_ppo_steps_total") or 0.0
    config = dataclasses.replace(tiny_config(server, tiny_model, tmp_path), anchor_prompts=10**4)
    assert one_round(config) is False
    new = [v for v in client.versions().versions if v.id not in {b.id for b in before.versions}]
    assert [v.name for v in new] == ["reward"], new  # refitted, validated, but no policy
    assert new[0].metrics["validated"] == 1.0
    assert learner_metrics.REGISTRY.get_sample_value("flywheel_learner_ppo_steps_total") == steps
    assert "needs 10000 before a policy is trained" in caplog.text


def test_a_candidate_that_passes_runs_as_the_challenger_when_asked(
    server: ServerProcess, tiny_model: Path, client: FlywheelClient, tmp_path: Path
) -> None:
    label(client, "e2e-ch", seed=10)
    live = client.versions().live["policy"]
    config = dataclasses.replace(tiny_config(server, tiny_model, tmp_path), challenger=True)
    assert one_round(config) is False  # not live: the labelers decide
    try:
        versions = client.versions()
        newest = max((v for v in versions.versions if v.name == "policy"), key=lambda v: v.version)
        assert versions.live["policy"] == live and newest.state == "ready"
        assert newest.metrics["gate_passed"] == 1.0
        challenge = versions.challenge
        assert challenge is not None and challenge.outcome == "running"
        assert (challenge.challenger, challenge.champion) == (newest.id, live)
    finally:
        client.stop_challenge()


def test_a_whole_round_runs_with_a_bfloat16_base_on_cpu(
    server: ServerProcess, tiny_model: Path, client: FlywheelClient, tmp_path: Path
) -> None:
    """--dtype bfloat16: refit, judge, PPO-ptx, gate and publish on a half-precision base; the
    adapters it ships are float32, as peft and the server load them."""
    from safetensors.torch import load_file

    label(client, "e2e-bf16", seed=13)
    before = {v.id for v in client.versions().versions}
    config = dataclasses.replace(tiny_config(server, tiny_model, tmp_path), dtype="bfloat16")
    assert config.precision.dtype == torch.bfloat16
    assert one_round(config) is True
    new = [v for v in client.versions().versions if v.id not in before]
    assert sorted(v.name for v in new) == ["policy", "reward"], new
    policy = next(v for v in new if v.name == "policy")
    assert client.versions().live["policy"] == policy.id  # loaded and served
    weights = load_file(
        str(next((tmp_path / "adapters").glob("policy-r*")) / "adapter_model.safetensors")
    )
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
