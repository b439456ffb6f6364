"""The learner's Prometheus metrics, in a registry of its own (the learner is its own process).

`flywheel learn --metrics-port N` serves them at http://127.0.0.1:N/metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry()

reward_train_loss = Gauge(
    "flywheel_learner_reward_train_loss",
    "Ranking loss at the end of the last reward refit",
    registry=REGISTRY,
)
reward_accuracy = Gauge(
    "flywheel_learner_reward_held_out_accuracy",
    "Held-out pairwise accuracy of the last reward refit (0..1)",
    registry=REGISTRY,
)
ppo_reward = Gauge(
    "flywheel_learner_ppo_reward_mean",
    "Reward-model score of the last PPO rollout",
    registry=REGISTRY,
)
ppo_kl = Gauge(
    "flywheel_learner_ppo_kl_nats",
    "KL to the reference per sequence, last PPO step",
    registry=REGISTRY,
)
ppo_ptx = Gauge(
    "flywheel_learner_ppo_ptx_loss", "Pretraining NLL of the last PPO step", registry=REGISTRY
)
ppo_clip = Gauge(
    "flywheel_learner_ppo_clip_fraction",
    "Share of tokens clipped in the last PPO step",
    registry=REGISTRY,
)
peak_memory = Gauge(
    "flywheel_learner_peak_memory_bytes",
    "Peak memory of the learner: CUDA max allocated on its device, else peak RSS",
    registry=REGISTRY,
)
ppo_steps = Counter("flywheel_learner_ppo_steps_total", "PPO-ptx steps taken", registry=REGISTRY)
versions = Counter(
    "flywheel_learner_versions_total",
    "Adapter versions published, by kind and outcome (promoted, challenger, or refused)",
    ["kind", "outcome"],
    registry=REGISTRY,
)
rounds = Counter("flywheel_learner_rounds_total", "Learning rounds completed", registry=REGISTRY)
rounds_skipped = Counter(
    "flywheel_learner_rounds_skipped_total",
    "Rounds that ended after the reward refit: no validated reward model to train a policy on",
    registry=REGISTRY,
)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on a background thread."""
    start_http_server(port, addr=host, registry=REGISTRY)
