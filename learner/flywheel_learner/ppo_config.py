"""PPO-ptx's hyper-parameters, and how they compare with the paper's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flywheel_learner.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    KLKind,
)
from flywheel_model import adapters

if TYPE_CHECKING:
    pass

# Paper (Ouyang et al. 2022, section 3.5 and appendix C.4) vs ours; "-" where the paper is silent.
# | setting          | paper                        | ours (default)   | why                         |
# |------------------|------------------------------|------------------|-----------------------------|
# | beta (KL coef)   | 0.02, fixed                  | 0.02, fixed      | same; adaptive optional     |
# | KL estimator     | log(pi / pi_SFT), per token  | k1, per token    | same                        |
# | gamma_ptx        | 27.8                         | 1.0              | see PPOConfig.gamma_ptx     |
# | value init       | from the reward model        | RM's LoRA + head | same, on the shared base    |
# | policy weights   | full fine-tuning             | LoRA r=8 + norm  | one base, hot-swap adapters |
# | batch / minibatch| 512 / 64 episodes            | 256 / 64         | CPU budget for the demo     |
# | epochs, lr       | -                            | 1, 1e-3 (LoRA)   | see PPOConfig.rollout_batch |
# | clip, GAE        | -                            | 0.2; 1, 0.95     | PPO's and GAE's usual ones  |
# | ptx data         | 8x the RL episodes           | one batch / step | CPU budget; ratio via gamma |


@dataclass(frozen=True)
class PPOConfig:
    """PPO-ptx hyper-parameters (one `ppo_step` consumes `rollout_batch` prompts).

    beta: KL coefficient of InstructGPT eq. 2 (initial value when adaptive_kl).
    adaptive_kl, kl_target, kl_horizon: Ziegler et al. 2019 eq. 3 control of beta toward
        kl_target nats per sequence; horizon counted in samples.
    gamma_ptx: weight of the pretraining NLL. The paper's 27.8 multiplies its own
        normalisation (a sum over a pretraining batch 8x the RL batch, against a per-episode
        RL objective) and does not transfer. Both of our terms are per-token means of O(1)
        size, so gamma_ptx = 1 gives the pretraining gradient the same weight per token as
        the policy gradient; on the demo that keeps the pretraining loss flat over 20 steps
        (bench/alignment_tax.py) while the reward still rises. 0 gives plain PPO, exactly: the
        ptx batch is then never forwarded.
    clip, value_clip: PPO ratio clip (Schulman et al. 2017 eq. 7) and value clip, both 0.2.
    vf_coef: value-loss weight. Policy and value share no trainable weight and their gradients
        are clipped apart, so it only rescales the value gradient, which Adam mostly undoes.
    gae_gamma, gae_lambda: GAE (Schulman et al. 2016 eq. 16); gamma 1 as rewards are episodic.
    epochs, minibatches, micro_batches: passes over a rollout, optimiser steps per pass, and
        gradient-accumulation chunks per minibatch (micro_batches only saves memory).
    max_tokens_per_microbatch: when > 0, micro-batches are sized in tokens instead
        (`token_budget.pack`: rows by length, count x longest within it, padding trimmed),
        for the PPO and the ptx forwards alike; micro_batches is then unused.
    gradient_checkpointing: recompute each decoder layer's activations in the backward of the
        policy, value and ptx forwards instead of keeping them (`flywheel_model.checkpointing`).
    rollout_batch: prompts sampled per step, one epoch over them in 4 minibatches of 64: near
        the paper's 512 / 64. On CPU sampling is cheap (32 responses in 0.06 s, scoring them
        0.14 s, against 1 s for 4 epochs of updates), so 8x the samples per step cost little:
        with a perfect reward on the demo (bench/ppo_curve.py), 256 x 1 epoch at lr 1e-3 and
        32 x 4 epochs at lr 3e-4 raise temperature-1 accuracy alike per second of steps
        (43% -> 57% in about 100 s), the larger batch with a less noisy gradient per step.
    samples_per_prompt: K responses sampled for each prompt of a step (rollout_batch / K
        prompts). With K > 1 each score is compared with the other K - 1 responses to the same
        prompt (`ppo_math.leave_one_out`, as RLOO) before the KL penalty and GAE, so the
        advantage says which answer was better for this prompt, not which prompt was easier.
    max_new_tokens, temperature: rollout sampling; log-probs use the same temperature so the
        ratio's pi_old is the distribution the samples came from.
    lora_r, lora_alpha, target_modules: the policy adapter, by default on every linear layer
        but the output head (`adapters.ALL_LINEAR`, whatever the family names them). Dropout
        is fixed at 0: with it, pi_theta != pi_old before the first update and the ratio
        starts off 1.
    final_norm_lr: learning rate of the policy's own copy of the final norm's weights, trained
        with its LoRA and saved in its adapter (PEFT's `modules_to_save`); 0 keeps the policy
        LoRA only, as it is for a model without a `model.norm` (GPT-2, GPT-NeoX). The final RMSNorm sets the length of the last hidden state, so LoRA on the
        projections can turn it but not lengthen it: the scale of the logits, the policy's
        temperature, is out of its reach. On the demo (bench/ppo_curve.py) PPO with this
        handle raises temperature-1 accuracy from 0.43 to 0.68 in 20 steps, against 0.51
        with LoRA alone. The weights start near 1 and a useful change is of that size, so they
        get a larger lr than the LoRA matrices.
    kl_estimator: the per-token KL in the reward ("k1" = log pi - log pi_ref, as the paper).
    """

    beta: float = 0.02
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10_000
    gamma_ptx: float = 1.0
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    gae_gamma: float = 1.0
    gae_lambda: float = 0.95
    epochs: int = 1
    minibatches: int = 4
    micro_batches: int = 1
    max_tokens_per_microbatch: int = 0
    gradient_checkpointing: bool = False
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    samples_per_prompt: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0
    rollout_batch: int = 256
    ptx_batch: int = 32
    ptx_max_length: int = 128
    reward_max_length: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = adapters.ALL_LINEAR
    final_norm_lr: float = 3e-2
    kl_estimator: KLKind = "k1"
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_ranges()
        self._check_batches()
        if self.adaptive_kl and self.beta <= 0:
            raise ValueError(
                f"adaptive_kl needs beta > 0 to scale from, got {self.beta}; "
                "set beta (e.g. 0.02) or adaptive_kl=False"
            )

    def _check_ranges(self) -> None:
        positive = ("kl_target", "clip", "value_clip", "lr", "max_grad_norm", "temperature")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        at_least_one = ("kl_horizon", "epochs", "minibatches", "micro_batches", "max_new_tokens",
                        "rollout_batch", "samples_per_prompt", "ptx_batch", "lora_r",
                        "lora_alpha")  # fmt: skip
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("beta", "gamma_ptx", "vf_coef", "final_norm_lr", "max_tokens_per_microbatch"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gae_gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.ptx_max_length < 2 or self.reward_max_length < 2:
            raise ValueError(
                f"ptx_max_length and reward_max_length must be >= 2, got "
                f"{self.ptx_max_length} and {self.reward_max_length}"
            )
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {self.kl_estimator!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, e.g. ('q_proj',)")

    def _check_batches(self) -> None:
        if self.rollout_batch % self.samples_per_prompt:
            raise ValueError(
                f"rollout_batch ({self.rollout_batch}) must be divisible by samples_per_prompt "
                f"({self.samples_per_prompt}): each prompt gets that many responses"
            )
        if self.rollout_batch % self.minibatches:
            raise ValueError(
                f"rollout_batch ({self.rollout_batch}) must be divisible by minibatches "
                f"({self.minibatches}) so every optimiser step sees as many samples"
            )
        rows = self.rollout_batch // self.minibatches
        if self.micro_batches > rows:
            raise ValueError(
                f"micro_batches ({self.micro_batches}) must be <= the rows of a minibatch "
                f"(rollout_batch / minibatches = {rows})"
            )
        if self.gamma_ptx > 0 and self.micro_batches > self.ptx_batch:
            raise ValueError(
                f"micro_batches ({self.micro_batches}) must be <= ptx_batch ({self.ptx_batch}) "
                "when gamma_ptx > 0: the pretraining batch is accumulated in as many chunks"
            )

    @property
    def prompts_per_step(self) -> int:
        """How many distinct prompts one `ppo_step` takes."""
        return self.rollout_batch // self.samples_per_prompt

    def kl_controller(self, beta: float | None = None) -> KLController:
        """A fresh controller; `beta` resumes an adaptive one where an earlier run left it."""
        if self.adaptive_kl:
            return AdaptiveKLController(beta or self.beta, self.kl_target, self.kl_horizon)
        return FixedKLController(self.beta)
