"""The demo model: built locally from code, so Flywheel serves something with no download.

A byte-level tokenizer trained on the demo task, a small random Llama, SFT on mixed-quality
demonstrations, and an initial reward model fitted on preference pairs, cached in the data
directory under a hash of the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch

from flywheel_demo import task as demo_task
from flywheel_demo.tokenizer import train_tokenizer
from flywheel_learner.reward import (
    RewardConfig,
    RewardFit,
    fit_reward_model,
    normalise_head_bias,
)
from flywheel_learner.sft import SFTConfig, sft
from flywheel_model import adapters, loading

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

# Bump when the build recipe changes so cached builds of the same config are not reused.
# 2: the reward head weighs the response likelihood; 3: pretraining on documents before SFT;
# 4: the documents also mixed into SFT
BUILD_FORMAT = 4
MODEL_DIR, REWARD_DIR, BUILD_INFO = "model", "reward-init", "build.json"
PRETRAINING, PRETRAINING_TEXTS = "pretraining.txt", 4096

T = TypeVar("T")


@dataclass(frozen=True)
class DemoModelConfig:
    """Sizes and training budget of the demo model (defaults take ~2.5 minutes on 2 CPU cores)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    vocab_size: int = 320
    tokenizer_texts: int = 2000
    demonstrations: int = 20000
    demo_quality: float = 0.7
    # Steps of language modelling on plain documents (`demo_task.pretraining_document`, every
    # token scored) before SFT: the corpus of the ptx term and of the gate's pretraining loss.
    # Lines of bare instructions (unpredictable letters) took greedy accuracy from 0.79 to
    # 0.26 mixed into SFT (15% of rows) and to 0.09 as this phase: see that function.
    pretraining_steps: int = 100
    # Documents mixed into the SFT rows, as a share of the demonstrations. Without them SFT
    # forgets the documents (4.7 nats/token after it), and PPO-ptx then spends its updates
    # re-learning them instead of only holding the policy near its pretraining, which turned
    # every candidate's reward gain negative under `correct`. 5% leaves them at 1.2.
    sft_document_share: float = 0.05
    sft_steps: int = 400
    sft_batch_size: int = 128
    sft_lr: float = 3e-3
    # Fresh pairs are free and the reward adapter overfits 2k pairs within a few epochs.
    preference_pairs: int = 6000
    reward_steps: int = 400
    reward_batch_rankings: int = 32
    eval_examples: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "demonstrations", "sft_steps", "preference_pairs", "reward_steps",
                     "eval_examples"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 32 <= self.max_position_embeddings <= 4096:
            raise ValueError(
                f"max_position_embeddings must be between 32 and 4096, got {self.max_position_embeddings}"
            )
        if not 0.0 <= self.demo_quality <= 1.0:
            raise ValueError(f"demo_quality must be between 0 and 1, got {self.demo_quality}")
        if self.pretraining_steps < 0:
            raise ValueError(f"pretraining_steps must be >= 0, got {self.pretraining_steps}")
        if not 0.0 <= self.sft_document_share < 1.0:
            raise ValueError(f"sft_document_share must be in [0, 1), got {self.sft_document_share}")

    def short_hash(self) -> str:
        payload = json.dumps({"format": BUILD_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


class DemoModel(NamedTuple):
    model_dir: Path  # a Hugging Face causal-LM directory (model + tokenizer)
    reward_dir: Path  # the initial reward adapter in adapters.save_adapter's format
    pretraining: Path  # the learner's ptx corpus: documents as the build learned, one a line
    info: dict[str, Any]  # build.json


def chat_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """The rendered prompt the policy sees for one user instruction."""
    messages = [{"role": "user", "content": instruction}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)  # tokenize=False
    return text


def _task_texts(rng: random.Random, n: int) -> list[str]:
    return [f"<|user|>\n{i}\n<|assistant|>\n{r}" for i, r in demo_task.demonstrations(rng, n)]


def _llama(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int,
    seed: int,
) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Tied: with a few hundred tokens the output matrix is small either way; tying halves it.
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _save_hf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    model.save_pretrained(directory)  # safetensors
    tokenizer.save_pretrained(directory)


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """An untrained tiny Llama + demo tokenizer saved as a HF directory, for tests (~1 s)."""
    return build_random_model(out_dir, hidden=32, layers=2, heads=2, intermediate=64, seed=seed)


def build_random_model(
    out_dir: Path,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """An untrained Llama of any size + demo tokenizer: speed does not need trained weights.
    The MLP is 4 × hidden wide unless `intermediate` says otherwise."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(_task_texts(random.Random(seed), 200))
    model = _llama(
        tokenizer,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate or 4 * hidden,
        max_positions=max_positions,
        seed=seed,
    )
    _save_hf(model, tokenizer, out_dir)
    return out_dir


@torch.no_grad()
def policy_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[demo_task.Example]
) -> dict[str, float]:
    """Greedy accuracy on `examples`, overall and per task."""
    prompts = [chat_prompt(tokenizer, e.instruction) for e in examples]
    batch = tokenizer(
        prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
    )
    out = model.generate(  # type: ignore[operator]
        **batch,
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    responses = tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    right = [bool(demo_task.check(p, r)) for p, r in zip(prompts, responses, strict=True)]
    scores = {"all": sum(right) / len(right)}
    for task in demo_task.TASKS:
        hits = [ok for ok, e in zip(right, examples, strict=True) if e.task == task]
        if hits:
            scores[task] = sum(hits) / len(hits)
    return scores


def _timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - start, 2)
    return result


def _train_policy(
    tokenizer: PreTrainedTokenizerBase, rng: random.Random, config: DemoModelConfig, progress: bool
) -> tuple[LlamaForCausalLM, float]:
    """A random Llama, fine-tuned on mixed-quality demonstrations; returns it and its SFT loss."""
    model = _llama(
        tokenizer,
        hidden=config.hidden_size,
        layers=config.num_layers,
        heads=config.num_heads,
        intermediate=config.intermediate_size,
        max_positions=config.max_position_embeddings,
        seed=config.seed,
    )
    if config.pretraining_steps:
        documents = [("", demo_task.pretraining_document(rng)) for _ in range(20_000)]
        steps = config.pretraining_steps
        pretrain = SFTConfig(steps=steps, batch_size=config.sft_batch_size, lr=config.sft_lr,
                             max_length=config.max_position_embeddings, seed=config.seed,
                             warmup=steps // 20)  # fmt: skip
        sft(model, tokenizer, documents, pretrain, progress=progress)
    demos = [
        (chat_prompt(tokenizer, i), r)
        for i, r in demo_task.demonstrations(rng, config.demonstrations, config.demo_quality)
    ]
    mixed_in = round(config.sft_document_share * len(demos))
    demos += [("", demo_task.pretraining_document(rng)) for _ in range(mixed_in)]
    sft_config = SFTConfig(
        steps=config.sft_steps,
        batch_size=config.sft_batch_size,
        lr=config.sft_lr,
        max_length=config.max_position_embeddings,
        seed=config.seed,
        warmup=config.sft_steps // 20,
    )
    return model, sft(model, tokenizer, demos, sft_config, progress=progress).final_loss


def _fit_initial_reward(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
    config: DemoModelConfig,
    progress: bool,
) -> RewardFit:
    """A reward adapter fitted on preference pairs, normalised so correct answers score 0."""
    triples = demo_task.preference_pairs(rng, config.preference_pairs)
    rankings = [(chat_prompt(tokenizer, i), [[good], [bad]]) for i, good, bad in triples]
    reward_config = RewardConfig(
        steps=config.reward_steps,
        batch_rankings=config.reward_batch_rankings,
        max_length=config.max_position_embeddings,
        seed=config.seed,
        warmup=config.reward_steps // 20,
    )
    fit = fit_reward_model(model, tokenizer, rankings, reward_config, progress=progress)
    correct = [(chat_prompt(tokenizer, i), good) for i, good, _ in triples]
    normalise_head_bias(
        fit.model, fit.head, tokenizer, correct, max_length=config.max_position_embeddings
    )
    return fit


def _build_into(tmp: Path, config: DemoModelConfig, progress: bool) -> dict[str, Any]:
    """Every build step, writing model/, reward-init/ and build.json's contents under `tmp`."""
    rng = random.Random(config.seed)
    timings: dict[str, float] = {}
    texts = _task_texts(rng, config.tokenizer_texts)
    tokenizer = _timed(timings, "tokenizer", lambda: train_tokenizer(texts, config.vocab_size))
    model, sft_loss = _timed(
        timings, "sft", lambda: _train_policy(tokenizer, rng, config, progress)
    )
    eval_examples = [demo_task.sample_example(rng) for _ in range(config.eval_examples)]
    accuracy = _timed(timings, "eval", lambda: policy_accuracy(model, tokenizer, eval_examples))
    parameters = sum(p.numel() for p in model.parameters())
    model_dir = tmp / MODEL_DIR
    _save_hf(model, tokenizer, model_dir)
    # The reward adapter is added to this same (now saved) model: its base stays frozen.
    fit = _timed(
        timings, "reward", lambda: _fit_initial_reward(model, tokenizer, rng, config, progress)
    )
    adapters.save_adapter(
        fit.model, fit.adapter_name, tmp / REWARD_DIR, head=fit.head,
        base_model=loading.base_fingerprint(model_dir),
    )  # fmt: skip
    return {
        "format": BUILD_FORMAT,
        "config": dataclasses.asdict(config),
        "parameters": parameters,
        "sft_loss": round(sft_loss, 4),
        "policy_accuracy": {k: round(v, 3) for k, v in accuracy.items()},
        "reward_train_loss": round(fit.train_loss, 4),
        "reward_held_out_accuracy": round(fit.held_out_accuracy, 4),
        "tokens": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "vocab": len(tokenizer),
        },
        "seconds": timings,
    }


def build_demo_model(
    out_dir: Path, config: DemoModelConfig = DemoModelConfig(), *, progress: bool = True
) -> Path:
    """Build the demo model into `out_dir` (model/, reward-init/, build.json), atomically.

    Everything is built in a temporary sibling directory and renamed into place, so a crash
    never leaves a half-built model that a later start would take for a finished one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        start = time.perf_counter()
        info = _build_into(tmp, config, progress)
        info["seconds"]["total"] = round(time.perf_counter() - start, 2)
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_demo_model(
    data_dir: Path, config: DemoModelConfig = DemoModelConfig(), *, progress: bool = True
) -> DemoModel:
    """The cached demo model for `config` under `data_dir/models/`, built on first use."""
    out_dir = Path(data_dir) / "models" / f"demo-{config.short_hash()}"
    if not (out_dir / BUILD_INFO).is_file():
        build_demo_model(out_dir, config, progress=progress)
    info = json.loads((out_dir / BUILD_INFO).read_text())
    corpus = out_dir / PRETRAINING
    if not corpus.is_file():  # fresh documents from a seed of its own: the build saw others
        texts = demo_task.pretraining_texts(random.Random(config.seed + 1), PRETRAINING_TEXTS)
        tmp = corpus.with_suffix(".tmp")
        tmp.write_text("\n".join(texts) + "\n")
        tmp.rename(corpus)
    return DemoModel(out_dir / MODEL_DIR, out_dir / REWARD_DIR, corpus, info)
