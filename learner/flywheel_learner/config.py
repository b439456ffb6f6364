"""What `flywheel learn` runs with: one typed, validated, immutable config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel_learner.gate import GateThresholds
from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.reward import RewardConfig
from flywheel_learner.reward_refit import (
    Validation,
)
from flywheel_model import adapters
from flywheel_model.precision import Precision, check_names, resolve

if TYPE_CHECKING:
    pass

# KL to the reference, controlled (Ziegler et al. 2019) toward half the gate's max_kl, with beta
# carried from round to round (each round continues the live policy). At a fixed beta of 0.02
# and unit-scale rewards the KL grew round by round to 11.7-25.5 nats under `longer` and
# `contains:x`. A horizon of 1,024 samples lets beta move up to 2.6-fold in a round of 20 steps.
LEARNER_PPO = PPOConfig(beta=0.1, adaptive_kl=True, kl_target=10.0, kl_horizon=1024)
# The refit's budget grows with the data (8 passes, up to 400 steps) and stops early on the
# held-out loss, after a fresh head is probed on the frozen features (see LearnerConfig.reward).
LEARNER_REWARD = RewardConfig(
    steps=400, max_epochs=8.0, eval_every=25, patience=3, held_out=0.2, probe_steps=200
)


@dataclass(frozen=True)
class LearnerConfig:
    """Everything `flywheel learn` runs with; `flywheel learn --help` maps onto it.

    server, api_key: gRPC target and an admin-scope key (None when auth is off).
    tls_ca, tls_cert, tls_key: connect over TLS trusting tls_ca (PEM), with a client
        certificate when the server requires one (mutual TLS); all None: plain TCP.
    model_dir: the base the server serves, loaded again locally; its fingerprint must equal
        the server's `base_model`, or every adapter would be refused.
    work_dir: checkpoints, the exported feedback and every adapter this learner wrote.
    min_new_rankings, interval_s: wake when this many rankings arrived since the last round,
        or when interval_s passed and at least one did. poll_s: how often to look.
    max_rounds: stop after this many rounds (None = run until stopped).
    ppo_steps_per_round: `ppo_step` calls per round (each one rollout of ppo.rollout_batch).
    kl_stop: a round's PPO ends early once a rollout's KL to the reference (nats per
        completion) passes this; None = 0.8 of the gate's max_kl.
    eval_prompts: held-out prompts the candidate and the live policy are compared on.
    gate: what a candidate must achieve to go live.
    rm_min_accuracy, rm_min_held_out_pairs: what a reward model must show on the held-out
        rankings (`reward_refit.Validation`) to be promoted, to train a policy and to judge
        one. With no such model a round ends after the refit and publishes no policy.
    rm_held_out_window: the newest this many held-out rankings are the ones measured.
    anchor_prompts: a round trains a policy only once the held-out rankings hold this many
        distinct prompts, so that the gate's human anchor (`anchor`) has rankings to judge the
        candidate's greedy answers by; before that the round ends after the refit.
    pretraining: a .txt/.jsonl corpus for the ptx term and the gate's pretraining-loss check;
        None = PPO without the ptx term, and no such check (logged at start).
    reward_init: a saved reward model the first refit warm-starts from (the demo's initial
        one under `flywheel up`); later refits start from the last promoted refit. Either is
        only a prior: every refit also fits from scratch and keeps the better
        (`reward_refit`), and the log reports reward_init's accuracy on the same rankings.
    import_preferences: JSONL preference files (`preference_data`) added to every refit.
    challenger: publish a candidate that passes the gate as the server's challenger, to be
        promoted or retired by live labelers' blind comparisons, instead of promoting it.
    threads: torch CPU threads (0 = one per core). `flywheel up` gives the learner the cores
        its server does not use.
    device, dtype: where the base weights live and their precision (`flywheel_model.precision`:
        auto = CUDA in bfloat16 when present, else CPU in float32); what trains stays float32.
    """

    server: str
    model_dir: Path
    work_dir: Path
    api_key: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    min_new_rankings: int = 16
    interval_s: float = 120.0
    poll_s: float = 5.0
    max_rounds: int | None = None
    # LEARNER_REWARD. The old cap of 100
    # steps warm-started from the demo's reward model never overruled it: after 2,000 rankings
    # of another preference its accuracy was 0.33 (issue 15). On 500 live `incorrect` rankings
    # the probe takes held-out accuracy from 0.62 to 0.92, warm or fresh.
    reward: RewardConfig = field(default_factory=lambda: LEARNER_REWARD)
    ppo: PPOConfig = field(default_factory=lambda: LEARNER_PPO)
    ppo_steps_per_round: int = 20
    # Within a round the KL can outrun the controller: under `longer`, one refit's reward model
    # took PPO from 2 to 22 nats in 12 steps while beta only doubled. So a round's PPO ends once
    # a rollout's KL passes kl_stop; later steps could only carry the candidate past max_kl.
    kl_stop: float | None = None
    # 16 prompts, one sample each, refused two good rounds in a row on noise (reward gain -0.12
    # and -0.04); 128 cost about a second more.
    eval_prompts: int = 128
    gate: GateThresholds = field(default_factory=GateThresholds)
    rm_min_accuracy: float = 0.6
    rm_min_held_out_pairs: int = 50
    rm_held_out_window: int = 400
    # Under `correct` the anchor judges about one held-out prompt in six (the candidate changed
    # the greedy answer and a ranking holds both answers): 32 give it about five.
    anchor_prompts: int = 32
    pretraining: Path | None = None
    reward_init: Path | None = None
    import_preferences: tuple[Path, ...] = ()
    challenger: bool = False
    seed: int = 0
    timeout_s: float = 120.0
    threads: int = 0
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not self.server:
            raise ValueError("server must be a gRPC address such as 127.0.0.1:50051")
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(
                f"model_dir {self.model_dir} is not a Hugging Face model directory (no "
                "config.json); pass the directory the server serves"
            )
        if self.min_new_rankings < 1:
            raise ValueError(f"min_new_rankings must be >= 1, got {self.min_new_rankings}")
        for name in ("interval_s", "poll_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1 or None (forever), got {self.max_rounds}")
        if self.ppo_steps_per_round < 1:
            raise ValueError(f"ppo_steps_per_round must be >= 1, got {self.ppo_steps_per_round}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = one per core), got {self.threads}")
        if self.eval_prompts < 1:
            raise ValueError(f"eval_prompts must be >= 1, got {self.eval_prompts}")
        if not 0 < self.stop_kl <= self.gate.max_kl:
            raise ValueError(
                f"kl_stop ({self.stop_kl} nats) must be above 0 and at most the gate's max_kl "
                f"({self.gate.max_kl})"
            )
        if self.ppo.adaptive_kl and not self.ppo.kl_target < self.gate.max_kl:
            raise ValueError(
                f"ppo.kl_target ({self.ppo.kl_target} nats) must be below the gate's max_kl "
                f"({self.gate.max_kl}), or every candidate PPO aims for is refused"
            )
        Validation(self.rm_min_accuracy, self.rm_min_held_out_pairs)  # raises when out of range
        check_names(self.device, self.dtype)
        if self.anchor_prompts < 0:
            raise ValueError(f"anchor_prompts must be >= 0, got {self.anchor_prompts}")
        if self.rm_held_out_window < 1:
            raise ValueError(f"rm_held_out_window must be >= 1, got {self.rm_held_out_window}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give tls_cert and tls_key together, or neither")
        tls = [p for p in (self.tls_ca, self.tls_cert, self.tls_key) if p is not None]
        for path in (*self.import_preferences, *([self.pretraining] if self.pretraining else []),
                     *tls):  # fmt: skip
            if not Path(path).is_file():
                raise ValueError(f"{path} does not exist or is not a file")
        if self.reward_init is not None:
            adapters.read_adapter_config(self.reward_init)  # a clear error if it is no adapter

    @property
    def tls(self) -> bool:
        return any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))

    @property
    def precision(self) -> Precision:
        """device and dtype made concrete on this machine (`flywheel_model.precision`)."""
        return resolve(self.device, self.dtype)

    @property
    def stop_kl(self) -> float:
        return 0.8 * self.gate.max_kl if self.kl_stop is None else self.kl_stop

    @property
    def validation(self) -> Validation:
        return Validation(self.rm_min_accuracy, self.rm_min_held_out_pairs)
