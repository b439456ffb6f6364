"""The four models of PPO-ptx as adapters on one shared base (InstructGPT step 3).

One copy of the base weights serves four roles (docs/architecture.md, "Learning"):

    policy     LoRA "policy", trainable, starts at zero (so it starts as the SFT base)
    value      LoRA "value" + ScoreHead, trainable, both initialised from the reward model
    reward     LoRA "reward" + ScoreHead, frozen, loaded from a `adapters.save_adapter` dir
    reference  the base with every adapter disabled (pi_SFT of InstructGPT eq. 2)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flywheel_learner import token_budget
from flywheel_learner.ppo_math import (
    ptx_loss,
)
from flywheel_model import adapters, checkpointing, llama, lm_head, loading, scoring
from flywheel_model.precision import FLOAT32_CPU, Precision
from flywheel_model.scoring import make_batch, reward_tokens, score_batch

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.ptx_data import PtxBatch

log = logging.getLogger("flywheel.learner")

POLICY, VALUE, REWARD = "policy", "value", "reward"
TRAINABLE = (POLICY, VALUE)


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
        reward_head: scoring.ScoreHead,
        value_head: scoring.ScoreHead,
        config: PPOConfig,
        precision: Precision = FLOAT32_CPU,
    ) -> None:
        self.peft = peft_model
        self.precision = precision
        self.tokenizer = tokenizer
        self.reward_head = reward_head.requires_grad_(False)
        self.value_head = value_head.requires_grad_(True)
        self._heads = {REWARD: self.reward_head}
        self.config = config
        # The LM head runs on final hidden states in bounded chunks (`lm_head`), where it
        # reproduces the model's own logits; otherwise the forward's logits are used.
        head = lm_head.head_of(peft_model)
        self._head = (
            head if lm_head.reproduces_forward(peft_model, head, precision.autocast) else None
        )
        named = list(peft_model.named_parameters())
        self._policy = [p for n, p in named if f".{POLICY}." in n]
        self.policy_norm = [p for n, p in named if f"modules_to_save.{POLICY}." in n]
        value_lora = [p for n, p in named if f".{VALUE}." in n]
        # values read hidden states only: the head's likelihood weight neither runs nor trains
        self._value = value_lora + list(value_head.linear.parameters())
        self.use(POLICY)

    @classmethod
    def build(
        cls,
        base_dir: str | Path,
        reward_dir: str | Path,
        config: PPOConfig,
        precision: Precision = FLOAT32_CPU,
    ) -> SharedBaseModels:
        """Load the base once, add the three adapters, copy the reward head into the value head.

        The value adapter is a trainable copy of the reward adapter (its own rank and alpha,
        not the policy's), so value and reward LoRA always match in shape. The base is loaded
        on `precision.device` in `precision.dtype`; adapters and heads are float32 there.
        """
        from peft import LoraConfig, PeftModel

        adapters.read_adapter_config(reward_dir)  # a clear error when it is not an adapter
        base, tokenizer = loading.load_base(
            base_dir, device=precision.device, dtype=precision.dtype
        )
        if config.gradient_checkpointing:
            checkpointing.enable(base)
        norm_problem = _final_norm_problem(base) if config.final_norm_lr > 0 else "off"
        own_norm = norm_problem is None
        if config.final_norm_lr > 0 and not own_norm:
            log.warning("the policy trains its LoRA only (final_norm_lr unused): %s",
                        norm_problem)  # fmt: skip
        model = PeftModel.from_pretrained(
            base, str(reward_dir), adapter_name=REWARD, is_trainable=False
        )
        model.load_adapter(str(reward_dir), adapter_name=VALUE, is_trainable=True)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=adapters.peft_targets(config.target_modules, base),
            modules_to_save=[adapters.FINAL_NORM] if own_norm else None,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(config.seed)  # LoRA A is random; B = 0 keeps policy == base at start
        model.add_adapter(POLICY, lora)
        _float32_trainables(model)
        model.eval()
        hidden = model.config.hidden_size
        reward_head = scoring.ScoreHead.load(Path(reward_dir), hidden).to(precision.device)
        value_head = scoring.ScoreHead.load(Path(reward_dir), hidden).to(precision.device)
        return cls(model, tokenizer, reward_head, value_head, config, precision)

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

    def _inputs(self, ids: torch.Tensor, attention: torch.Tensor) -> dict[str, torch.Tensor]:
        """ids, attention: (B, L). Position ids follow the attention mask, as in generate, so
        left-padded prompts see the same positions when sampled and when scored."""
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        return {"input_ids": ids, "attention_mask": attention, "position_ids": positions}

    def _states(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Final hidden states under the active adapter. (B, L) -> (B, L, H)"""
        with self.precision.autocast():
            return lm_head.final_states(self.peft, **self._inputs(ids, attention))

    def _logprobs(self, ids: torch.Tensor, attention: torch.Tensor, start: int) -> torch.Tensor:
        rows, width = ids.shape[0], ids.shape[1] - start  # B, R
        temperature = self.config.temperature
        if self._head is None:
            with self.precision.autocast():
                out = self.peft(**self._inputs(ids, attention), logits_to_keep=width + 1,
                                use_cache=False)  # fmt: skip
            logits = out.logits[:, :-1]  # (B, R, V)
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, R, V)
            return logp.gather(-1, ids[:, start:, None]).squeeze(-1)  # (B, R)
        states = self._states(ids, attention)[:, start - 1 : -1].reshape(rows * width, -1)
        with self.precision.autocast():
            logp = lm_head.token_logprobs(
                self._head, states, ids[:, start:].reshape(-1), temperature
            )
        return logp.view(rows, width)

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
    def policy_generate(
        self, ids: torch.Tensor, attention: torch.Tensor, *, greedy: bool = False
    ) -> torch.Tensor:
        """Plain sampling (no top-k/top-p: the ratio needs pi itself) from the policy, or its
        greedy answers.

        ids, attention: (B, P) left-padded prompts -> (B, P + R), R <= max_new_tokens; rows
        that stop early are padded after their eos.
        """
        self.use(POLICY)
        sampling = (
            {} if greedy else {"temperature": self.config.temperature, "top_k": 0, "top_p": 1.0}
        )
        with self.precision.autocast():
            return self.peft.generate(
                input_ids=ids.to(self.precision.device),
                attention_mask=attention.to(self.precision.device),
                do_sample=not greedy,
                **sampling,
                max_new_tokens=self.config.max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )

    def values(self, ids: torch.Tensor, attention: torch.Tensor, start: int) -> torch.Tensor:
        """V of the state before each token of ids[:, start:]. (B, L) -> (B, R)."""
        self.use(VALUE)
        states = self._states(ids, attention)[:, start - 1 : -1]  # (B, R, H)
        return self.value_head(states.float())  # (B, R), in float32 as the head

    def add_scorer(self, name: str, directory: Path) -> None:
        """Load another saved reward model beside the four roles, frozen (the gate's judge)."""
        self.peft.load_adapter(str(directory), adapter_name=name, is_trainable=False)
        head = scoring.ScoreHead.load(directory, self.peft.config.hidden_size)
        self._heads[name] = head.to(self.precision.device).requires_grad_(False)

    @torch.no_grad()
    def rewards(
        self, prompts: Sequence[str], responses: Sequence[str], scorer: str = REWARD
    ) -> torch.Tensor:
        """Frozen reward-model scores of prompt + response + eos, re-tokenised as in training;
        `scorer`: the reward model, or one added with `add_scorer`.

        The head was shifted so demonstrations score 0 (reward.normalise_head_bias). -> (B,)
        """
        self.use(scorer)
        rows = [(p, [[r]]) for p, r in zip(prompts, responses, strict=True)]
        limit, budget = self.config.reward_max_length, self.config.max_tokens_per_microbatch
        groups = [list(range(len(rows)))]
        if budget > 0:
            pairs = list(zip(prompts, responses, strict=True))
            lengths = [len(ids) for ids, _ in reward_tokens(self.tokenizer, pairs, limit)]
            groups = token_budget.pack(lengths, budget)
        out = torch.empty(len(rows), device=self.precision.device)
        for group in groups:
            batch = make_batch(self.tokenizer, [rows[i] for i in group], limit)
            with self.precision.autocast():
                scores = score_batch(self.peft, self._heads[scorer], batch)
            out[torch.tensor(group, device=out.device)] = scores.float()
        return out

    def pretraining_nll(self, batch: PtxBatch) -> torch.Tensor:
        """Per-token NLL of a pretraining batch under the policy (the ptx term). -> scalar"""
        self.use(POLICY)
        batch = PtxBatch(*(t.to(self.precision.device) for t in batch))
        labels, mask = batch.input_ids[:, 1:], batch.loss_mask[:, 1:]
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with self.precision.autocast():
            if self._head is None:
                return ptx_loss(self.peft(**inputs, use_cache=False).logits[:, :-1], labels, mask)
            states = lm_head.final_states(self.peft, **inputs)[:, :-1].flatten(0, 1)  # (B*(T-1), H)
            nll = -lm_head.token_logprobs(self._head, states, labels.flatten())
        weights = mask.flatten().to(nll.dtype)
        return (nll * weights).sum() / weights.sum().clamp(min=1.0)


def _float32_trainables(model: torch.nn.Module) -> None:
    """Adapter weights (LoRA, and a policy's own copy of the final norm) in float32 over a
    half-precision base: peft already keeps LoRA there; the norm copy starts as the base's."""
    for name, p in model.named_parameters():
        if (".lora_" in name or "modules_to_save" in name) and p.dtype != torch.float32:
            p.data = p.data.float()


def _final_norm_problem(base: Any) -> str | None:
    """Why a policy may not train its own final norm on this base, or None. The server applies
    such a norm in its lean decoder only, which takes Llama-shaped models."""
    if not _has_module(base, adapters.FINAL_NORM):
        return f"this {base.config.model_type} model has no {adapters.FINAL_NORM}"
    problem = llama.config_problem(base.config)
    return None if problem is None else f"the server decodes this model generically: {problem}"


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


def save_policy(models: SharedBaseModels, out_dir: str | Path, base_model_dir: str | Path) -> Path:
    """The policy adapter as a standard PEFT directory with the base's fingerprint."""
    return adapters.save_adapter(
        models.peft, POLICY, out_dir, base_model=loading.base_fingerprint(base_model_dir)
    )
