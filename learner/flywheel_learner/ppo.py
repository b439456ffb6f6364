"""PPO-ptx (InstructGPT step 3) with every model as an adapter on one shared base.

One copy of the base weights serves four roles (ARCHITECTURE.md, "Learning"):

    policy     LoRA "policy", trainable, starts at zero (so it starts as the SFT base)
    value      LoRA "value" + ScoreHead, trainable, both initialised from the reward model
    reward     LoRA "reward" + ScoreHead, frozen, loaded from a `modeling.save_adapter` dir
    reference  the base with every adapter disabled (pi_SFT of InstructGPT eq. 2)

A step reads top to bottom in `ppo_step`: sample -> score -> log-probs and values -> KL-shaped
rewards -> GAE -> whitened advantages -> epochs of shuffled minibatches (micro-batched) of
policy + value + gamma_ptx * pretraining loss -> one clipped optimiser step per minibatch.
The math is in `ppo_math`; this module only moves tensors between it and the models.

Tensors of a rollout are (B, R): B rows, R response columns, right-padded (`mask` marks the
response tokens up to and including eos). Column t holds the token at sequence position P + t
(P = the left-padded prompt width), its log-prob and the value of the state before it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from flywheel_learner import distributed, modeling
from flywheel_learner.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    KLKind,
    gae,
    kl_k1,
    kl_shaped_rewards,
    leave_one_out,
    masked_whiten,
    policy_loss,
    ppo_objective,
    ptx_loss,
    token_weighted_microbatches,
    value_loss,
)
from flywheel_learner.reward import make_batch, score_batch
from flywheel_learner.sft import collate, encode_pair

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

POLICY, VALUE, REWARD = "policy", "value", "reward"
TRAINABLE = (POLICY, VALUE)

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
    lora_r, lora_alpha, target_modules: the policy adapter. Dropout is fixed at 0: with it,
        pi_theta != pi_old before the first update and the ratio starts off 1.
    final_norm_lr: learning rate of the policy's own copy of the final norm's weights, trained
        with its LoRA and saved in its adapter (PEFT's `modules_to_save`); 0 keeps the policy
        LoRA only. The final RMSNorm sets the length of the last hidden state, so LoRA on the
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
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
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
        for name in ("beta", "gamma_ptx", "vf_coef", "final_norm_lr"):
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

    def kl_controller(self) -> KLController:
        if self.adaptive_kl:
            return AdaptiveKLController(self.beta, self.kl_target, self.kl_horizon)
        return FixedKLController(self.beta)


# --- the models --------------------------------------------------------------------------------


class SharedBaseModels:
    """Policy, value, reward and reference as adapters on one base (see the module docstring).

    Adapters are chosen per forward with `set_adapter`, not peft's `adapter_names=[...]`: peft
    refuses `adapter_names` in training mode and splits the batch per adapter. `set_adapter`
    also flips requires_grad, so `use` resets it: only policy and value LoRA ever train.
    The model stays in eval mode: every adapter has dropout 0, so pi_theta == pi_old exactly
    at the first update of each rollout (ratio 1), as PPO's clipping assumes.
    """

    def __init__(
        self,
        peft_model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        reward_head: modeling.ScoreHead,
        value_head: modeling.ScoreHead,
        config: PPOConfig,
    ) -> None:
        self.peft = peft_model
        self.tokenizer = tokenizer
        self.reward_head = reward_head.requires_grad_(False)
        self.value_head = value_head.requires_grad_(True)
        self.config = config
        named = list(peft_model.named_parameters())
        self._policy = [p for n, p in named if f".{POLICY}." in n]
        self.policy_norm = [p for n, p in named if f"modules_to_save.{POLICY}." in n]
        value_lora = [p for n, p in named if f".{VALUE}." in n]
        # values read hidden states only: the head's likelihood weight neither runs nor trains
        self._value = value_lora + list(value_head.linear.parameters())
        self.use(POLICY)

    @classmethod
    def build(
        cls, base_dir: str | Path, reward_dir: str | Path, config: PPOConfig
    ) -> SharedBaseModels:
        """Load the base once, add the three adapters, copy the reward head into the value head.

        The value adapter is a trainable copy of the reward adapter (its own rank and alpha,
        not the policy's), so value and reward LoRA always match in shape.
        """
        from peft import LoraConfig, PeftModel

        modeling.read_adapter_config(reward_dir)  # a clear error when it is not an adapter
        base, tokenizer = modeling.load_base(base_dir)
        if config.final_norm_lr > 0 and not _has_module(base, modeling.FINAL_NORM):
            raise ValueError(
                f"final_norm_lr > 0 trains the policy's own {modeling.FINAL_NORM}, which this "
                f"{base.config.model_type} model does not have; set final_norm_lr=0"
            )
        model = PeftModel.from_pretrained(
            base, str(reward_dir), adapter_name=REWARD, is_trainable=False
        )
        model.load_adapter(str(reward_dir), adapter_name=VALUE, is_trainable=True)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(config.target_modules),
            modules_to_save=[modeling.FINAL_NORM] if config.final_norm_lr > 0 else None,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(config.seed)  # LoRA A is random; B = 0 keeps policy == base at start
        model.add_adapter(POLICY, lora)
        model.eval()
        hidden = model.config.hidden_size
        reward_head = modeling.ScoreHead.load(Path(reward_dir), hidden)
        value_head = modeling.ScoreHead.load(Path(reward_dir), hidden)
        return cls(model, tokenizer, reward_head, value_head, config)

    def use(self, adapter: str) -> None:
        self.peft.set_adapter(adapter)
        for name, p in self.peft.named_parameters():
            p.requires_grad_(any(f".{a}." in name for a in TRAINABLE))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._policy + self._value

    def trainable_groups(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(policy LoRA, value LoRA + value head): the two sets that train, sharing nothing.
        Found once, when the models are built, not on every minibatch."""
        return self._policy, self._value

    def _forward(
        self, ids: torch.Tensor, attention: torch.Tensor, keep: int, hidden: bool = False
    ) -> Any:
        """ids, attention: (B, L). Position ids follow the attention mask, as in generate, so
        left-padded prompts see the same positions when sampled and when scored."""
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        return self.peft(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            logits_to_keep=keep,
            output_hidden_states=hidden,
        )

    def _logprobs(self, ids: torch.Tensor, attention: torch.Tensor, start: int) -> torch.Tensor:
        width = ids.shape[1] - start  # R
        logits = self._forward(ids, attention, keep=width + 1).logits[:, :-1]  # (B, R, V)
        logp = torch.log_softmax(logits.float() / self.config.temperature, dim=-1)  # (B, R, V)
        return logp.gather(-1, ids[:, start:, None]).squeeze(-1)  # (B, R)

    def policy_logprobs(
        self, ids: torch.Tensor, attention: torch.Tensor, start: int
    ) -> torch.Tensor:
        """log pi(token) of ids[:, start:] under the policy. ids, attention: (B, L) -> (B, R)."""
        self.use(POLICY)
        return self._logprobs(ids, attention, start)

    def reference_logprobs(
        self, ids: torch.Tensor, attention: torch.Tensor, start: int
    ) -> torch.Tensor:
        """log pi_SFT(token): the same base with every adapter off. (B, L) -> (B, R)."""
        with torch.no_grad(), self.peft.disable_adapter():
            return self._logprobs(ids, attention, start)

    @torch.no_grad()
    def policy_generate(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Plain sampling (no top-k/top-p: the ratio needs pi itself) from the policy.

        ids, attention: (B, P) left-padded prompts -> (B, P + R), R <= max_new_tokens; rows
        that stop early are padded after their eos.
        """
        self.use(POLICY)
        return self.peft.generate(
            input_ids=ids,
            attention_mask=attention,
            do_sample=True,
            temperature=self.config.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.config.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def values(self, ids: torch.Tensor, attention: torch.Tensor, start: int) -> torch.Tensor:
        """V of the state before each token of ids[:, start:]. (B, L) -> (B, R)."""
        self.use(VALUE)
        out = self._forward(ids, attention, keep=1, hidden=True)
        states = out.hidden_states[-1][:, start - 1 : -1]  # (B, R, H)
        return self.value_head(states)  # (B, R)

    @torch.no_grad()
    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Frozen reward-model scores of prompt + response + eos, re-tokenised as in training.

        The head was shifted so demonstrations score 0 (reward.normalise_head_bias). -> (B,)
        """
        self.use(REWARD)
        rows = [(p, [[r]]) for p, r in zip(prompts, responses, strict=True)]
        batch = make_batch(self.tokenizer, rows, self.config.reward_max_length)
        return score_batch(self.peft, self.reward_head, batch)

    def pretraining_nll(self, batch: PtxBatch) -> torch.Tensor:
        """Per-token NLL of a pretraining batch under the policy (the ptx term). -> scalar"""
        self.use(POLICY)
        logits = self.peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return ptx_loss(logits[:, :-1], batch.input_ids[:, 1:], batch.loss_mask[:, 1:])


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def make_optimizer(models: SharedBaseModels, config: PPOConfig) -> torch.optim.Optimizer:
    # Adam's epsilon 1e-5 as in PPO's reference implementations: LoRA-B starts at 0, and the
    # default 1e-8 lets its first tiny gradients take full-size steps.
    norm = {id(p) for p in models.policy_norm}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in models.trainable_parameters() if id(p) not in norm]}
    ]
    if models.policy_norm:
        groups.append({"params": models.policy_norm, "lr": config.final_norm_lr})
    return torch.optim.AdamW(groups, lr=config.lr, eps=1e-5, weight_decay=0.0, fused=True)


# --- rollouts ----------------------------------------------------------------------------------


class Samples(NamedTuple):
    prompts: list[str]
    responses: list[str]  # decoded, special tokens dropped: what the reward model reads
    ids: torch.Tensor  # (B, L) left-padded prompt + right-padded response
    attention: torch.Tensor  # (B, L)
    start: int  # P: the prompt width, where every response begins
    mask: torch.Tensor  # (B, R) bool: response tokens up to and including the first eos

    def select(self, rows: slice) -> Samples:
        """These rows; the widths (and `start`) stay the batch's."""
        return Samples(
            self.prompts[rows], self.responses[rows], self.ids[rows], self.attention[rows],
            self.start, self.mask[rows],
        )  # fmt: skip


class Rollout(NamedTuple):
    ids: torch.Tensor  # (B, L)
    attention: torch.Tensor  # (B, L)
    start: int
    mask: torch.Tensor  # (B, R)
    logp: torch.Tensor  # (B, R) pi_old
    ref_logp: torch.Tensor  # (B, R) pi_SFT
    values: torch.Tensor  # (B, R) V_old
    advantages: torch.Tensor  # (B, R) whitened
    returns: torch.Tensor  # (B, R) value targets
    scores: torch.Tensor  # (B,) reward-model scores
    beta: float  # the KL coefficient the rewards were shaped with

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        """These rows of every per-row tensor; `start` and `beta` are the batch's."""
        r = rows
        return Rollout(
            self.ids[r], self.attention[r], self.start, self.mask[r], self.logp[r],
            self.ref_logp[r], self.values[r], self.advantages[r], self.returns[r],
            self.scores[r], self.beta,
        )  # fmt: skip


def response_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Mark each row's tokens up to and including its first eos. tokens: (B, R) -> (B, R) bool."""
    eos_before = (tokens == eos_id).long().cumsum(dim=1) - (tokens == eos_id).long()  # (B, R)
    return eos_before == 0


@torch.no_grad()
def sample_responses(models: SharedBaseModels, prompts: Sequence[str]) -> Samples:
    """Sample one response per prompt from the policy (left-padded batch, eos or length stop)."""
    tok = models.tokenizer
    batch = tok(
        list(prompts),
        add_special_tokens=False,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    out = models.policy_generate(batch["input_ids"], batch["attention_mask"])  # (B, P + R)
    start = batch["input_ids"].shape[1]
    mask = response_mask(out[:, start:], tok.eos_token_id)  # (B, R)
    tokens = out[:, start:].masked_fill(~mask, tok.pad_token_id)  # (B, R)
    ids = torch.cat([batch["input_ids"], tokens], dim=1)  # (B, L)
    attention = torch.cat([batch["attention_mask"].bool(), mask], dim=1).long()  # (B, L)
    responses = tok.batch_decode(tokens, skip_special_tokens=True)
    return Samples(list(prompts), responses, ids, attention, start, mask)


def collect_rollout(
    models: SharedBaseModels, prompts: Sequence[str], config: PPOConfig, beta: float
) -> Rollout:
    """Sample, score, and turn the scores into whitened per-token advantages."""
    return score_rollout(models, sample_responses(models, prompts), config, beta)


@torch.no_grad()
def score_rollout(models: SharedBaseModels, s: Samples, config: PPOConfig, beta: float) -> Rollout:
    """Score samples and turn the scores into whitened per-token advantages.

    Under torchrun `s` is this rank's shard, whitened with the global batch's statistics.
    """
    scores = models.rewards(s.prompts, s.responses)  # (B,)
    baselined = leave_one_out(scores, config.samples_per_prompt)  # (B,)
    logp = models.policy_logprobs(s.ids, s.attention, s.start)  # (B, R)
    ref_logp = models.reference_logprobs(s.ids, s.attention, s.start)  # (B, R)
    values = models.values(s.ids, s.attention, s.start)  # (B, R)
    rewards = kl_shaped_rewards(baselined, logp, ref_logp, s.mask, beta, config.kl_estimator)
    adv = gae(rewards, values, s.mask, config.gae_gamma, config.gae_lambda)  # (B, R) each
    advantages = masked_whiten(adv.advantages, s.mask, all_sum=distributed.all_sum)  # (B, R)
    return Rollout(
        s.ids, s.attention, s.start, s.mask, logp, ref_logp, values, advantages, adv.returns,
        scores, beta,
    )  # fmt: skip


# --- optimisation ------------------------------------------------------------------------------


class Metrics(NamedTuple):
    """Token-weighted means over a minibatch, or means over minibatches once `optimise` ends."""

    policy_loss: float
    value_loss: float
    policy_clip_fraction: float  # share of tokens whose ratio was clipped
    value_clip_fraction: float
    approx_kl: float  # KL(pi_old || pi_new), k3; `optimise` reports its last epoch's
    ptx_loss: float = math.nan  # NaN when gamma_ptx == 0 or no ptx batch: never computed


def mean_metrics(parts: Sequence[Metrics], weights: Sequence[float]) -> Metrics:
    columns = zip(*parts, strict=True)  # one tuple per field
    return Metrics(*(sum(w * v for w, v in zip(weights, col, strict=True)) for col in columns))


def ppo_losses(
    models: SharedBaseModels, part: Rollout, config: PPOConfig
) -> tuple[torch.Tensor, Metrics]:
    """policy + vf_coef * value loss of one micro-batch, and its metrics."""
    logp = models.policy_logprobs(part.ids, part.attention, part.start)  # (b, R)
    values = models.values(part.ids, part.attention, part.start)  # (b, R)
    pol = policy_loss(logp, part.logp, part.advantages, part.mask, config.clip)
    val = value_loss(values, part.values, part.returns, part.mask, config.value_clip)
    metrics = (pol.loss, val.loss, pol.clip_fraction, val.clip_fraction, pol.approx_kl)
    return ppo_objective(pol, val, config.vf_coef), Metrics(*(float(m.detach()) for m in metrics))


def _microbatches(mask: torch.Tensor, n: int) -> list[tuple[slice, float]]:
    """Micro-batches of this rank's rows, weighted by their share of the global tokens."""
    total = int(distributed.all_sum(mask.bool().sum()))
    rows = mask.shape[0]
    return token_weighted_microbatches(mask, min(n, rows), total) if rows else []


def accumulate_ppo(models: SharedBaseModels, mb: Rollout, config: PPOConfig) -> Metrics:
    """Backward of the minibatch's token-mean loss, in token-weighted micro-batches."""
    weighted = torch.zeros(len(Metrics._fields) - 1, dtype=torch.double)  # all but ptx_loss
    for rows, weight in _microbatches(mb.mask, config.micro_batches):
        loss, metrics = ppo_losses(models, mb.select(rows), config)
        (weight * loss).backward()
        weighted += weight * torch.tensor(metrics[:-1], dtype=torch.double)
    return Metrics(*distributed.all_sum(weighted).tolist())


def accumulate_ptx(models: SharedBaseModels, batch: PtxBatch, config: PPOConfig) -> float:
    """Backward of gamma_ptx * the pretraining NLL (InstructGPT eq. 2's last term).

    Every rank holds the same global batch and forwards its own contiguous shard of it.
    """
    batch = batch.select(slice(*distributed.bounds(batch.input_ids.shape[0], *distributed.world())))
    total = torch.zeros((), dtype=torch.double)
    scored = batch.loss_mask[:, 1:]  # (B, T-1), the labels ptx_loss reads
    for rows, weight in _microbatches(scored, config.micro_batches):
        nll = models.pretraining_nll(batch.select(rows))
        (config.gamma_ptx * weight * nll).backward()
        total += weight * float(nll.detach())
    return float(distributed.all_sum(total))


def minibatch_update(
    models: SharedBaseModels,
    optimizer: torch.optim.Optimizer,
    mb: Rollout,
    ptx_batch: PtxBatch | None,
    config: PPOConfig,
) -> Metrics:
    """One optimiser step on policy + vf_coef value + gamma_ptx ptx (eq. 2, as a loss).

    The terms are backpropagated one after another: gradients add, so this equals the
    gradient of `ppo_math.ppo_ptx_objective`, and with gamma_ptx == 0 the ptx batch is never
    forwarded, leaving plain PPO bit for bit.
    """
    optimizer.zero_grad(set_to_none=True)
    metrics = accumulate_ppo(models, mb, config)
    if ptx_batch is not None and config.gamma_ptx > 0:
        metrics = metrics._replace(ptx_loss=accumulate_ptx(models, ptx_batch, config))
    distributed.average_gradients(models.trainable_parameters())  # losses were weighted globally
    # Each role's gradient is clipped on its own. One joint clip let the value gradient (norm
    # ~35 on a fresh value head) scale the policy's down to Adam's epsilon, which all but
    # stopped the policy learning.
    for group in models.trainable_groups():
        torch.nn.utils.clip_grad_norm_(group, config.max_grad_norm)
    optimizer.step()
    return metrics


def optimise(
    models: SharedBaseModels,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    ptx_batch: PtxBatch | None,
    config: PPOConfig,
) -> Metrics:
    """`epochs` passes over the rollout in shuffled minibatches, one optimiser step each.

    Shuffles with torch's global generator, like sampling: the caller's seed fixes both.
    Under torchrun the ranks hold consecutive shards of the global rollout; rank 0's shuffle
    is used by all, and each forwards its own rows of every global minibatch.
    """
    local = rollout.mask.shape[0]
    start, total = distributed.row_offset(local)
    history: list[Metrics] = []
    for _ in range(config.epochs):
        order = distributed.from_rank0(torch.randperm(total))  # (B_global,)
        for rows in order.chunk(config.minibatches):
            mine = rows[(rows >= start) & (rows < start + local)] - start
            mb = rollout.select(mine)
            history.append(minibatch_update(models, optimizer, mb, ptx_batch, config))
    mean = mean_metrics(history, [1.0 / len(history)] * len(history))
    last_epoch = history[-config.minibatches :]
    return mean._replace(approx_kl=sum(m.approx_kl for m in last_epoch) / len(last_epoch))


# --- one step ----------------------------------------------------------------------------------


class PPOStats(NamedTuple):
    reward_mean: float  # reward-model score, before the KL penalty
    kl_mean: float  # per sequence: k1 summed over response tokens, mean over the batch
    ptx_loss: float
    policy_loss: float
    value_loss: float
    policy_clip_fraction: float
    value_clip_fraction: float
    approx_kl: float
    beta: float  # the coefficient this step's rewards used
    response_length: float  # mean response tokens, eos included
    seconds: float
    samples_per_second: float


def sequence_kl(rollout: Rollout) -> float:
    """Mean over rows (of every rank) of sum_t k1 over the response: what beta penalises."""
    per_token = kl_k1(rollout.logp, rollout.ref_logp) * rollout.mask  # (B, R)
    return distributed.global_mean(per_token.sum(dim=1))


def ppo_step(
    models: SharedBaseModels,
    optimizer: torch.optim.Optimizer,
    prompts: Sequence[str],
    ptx_batch: PtxBatch | None,
    config: PPOConfig,
    kl_ctl: KLController,
) -> PPOStats:
    """One PPO-ptx iteration: a rollout of `samples_per_prompt` responses to each of `prompts`
    (`config.prompts_per_step` of them), then `epochs` x `minibatches` updates.

    Under torchrun every rank passes the same global `prompts` and rolls out its own shard,
    so one prompt's responses, which are baselined against each other, stay on one rank.
    """
    started = time.perf_counter()
    k = config.samples_per_prompt
    local = [p for p in distributed.shard(prompts, *distributed.world()) for _ in range(k)]
    rollout = collect_rollout(models, local, config, kl_ctl.beta)
    update = optimise(models, optimizer, rollout, ptx_batch, config)
    kl = sequence_kl(rollout)
    kl_ctl.update(kl, n_steps=len(prompts) * k)
    seconds = time.perf_counter() - started
    return PPOStats(
        reward_mean=distributed.global_mean(rollout.scores),
        kl_mean=kl,
        ptx_loss=update.ptx_loss,
        policy_loss=update.policy_loss,
        value_loss=update.value_loss,
        policy_clip_fraction=update.policy_clip_fraction,
        value_clip_fraction=update.value_clip_fraction,
        approx_kl=update.approx_kl,
        beta=rollout.beta,
        response_length=distributed.global_mean(rollout.mask.sum(dim=1)),
        seconds=seconds,
        samples_per_second=len(prompts) * k / seconds,
    )


def save_policy(models: SharedBaseModels, out_dir: str | Path, base_model_dir: str | Path) -> Path:
    """The policy adapter as a standard PEFT directory with the base's fingerprint."""
    return modeling.save_adapter(
        models.peft, POLICY, out_dir, base_model=modeling.base_fingerprint(base_model_dir)
    )


# --- pretraining data (the ptx term) ----------------------------------------------------------

# A document (every token scored), or (context, continuation) where only the continuation is.
PtxText = str | tuple[str, str]


class PtxBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) right-padded, each text ends with eos
    attention_mask: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T) bool: the tokens the ptx NLL scores

    def select(self, rows: torch.Tensor | slice) -> PtxBatch:
        return PtxBatch(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows])


def demo_pretraining_texts(rng: random.Random, n: int) -> list[PtxText]:
    """The demo's pretraining corpus: fresh documents as the demo build mixed into its SFT.

    Words said a few times, every token scored (`demo_task.pretraining_document`). They carry
    no answer, so the ptx term protects the base's language modelling without favouring any
    preference over answers (issue 15: a corpus of correct answers fought every labeler who
    did not prefer them, and the gate's pretraining-loss check refused their policies).
    """
    from flywheel_learner import demo_task

    return [demo_task.pretraining_document(rng) for _ in range(n)]


def read_pretraining_texts(path: str | Path) -> list[PtxText]:
    """Documents from a .jsonl file ({"text": ...} per line) or a .txt file.

    A .txt file with blank lines is split into paragraphs; one without, into lines.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return list(_read_jsonl_texts(path))
    if path.suffix != ".txt":
        raise ValueError(f"pretraining texts must be a .txt or .jsonl file, got {path.name}")
    raw = path.read_text()
    parts = raw.split("\n\n") if "\n\n" in raw else raw.splitlines()
    texts: list[PtxText] = [p.strip() for p in parts if p.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{n} must be an object with a string "text" field')
        texts.append(record["text"])
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def ptx_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[PtxText],
    batch_size: int,
    max_length: int,
    rng: random.Random,
) -> Iterator[PtxBatch]:
    """Endless right-padded batches of `texts` + eos, reshuffled every pass.

    Encoded as SFT encodes (sft.encode_pair): a document is a continuation with no context.
    """
    if not texts:
        raise ValueError("ptx_batches needs at least one text")
    if batch_size < 1 or max_length < 2:
        raise ValueError(
            f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}"
        )
    encoded = [
        encode_pair(tokenizer, *(("", t) if isinstance(t, str) else t), max_length) for t in texts
    ]
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        rows, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        yield PtxBatch(*collate(rows, tokenizer.pad_token_id))
