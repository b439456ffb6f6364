import dataclasses
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.harness import random_reward_model
from flywheel_demo.model import build_tiny_model, chat_prompt
from flywheel_demo.task import pretraining_texts
from flywheel_learner.ppo import Rollout, collect_rollout, optimise, ppo_step, response_mask
from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer, save_policy
from flywheel_learner.ptx_data import PtxBatch, ptx_batches, read_pretraining_texts
from flywheel_model import adapters, loading

pytestmark = pytest.mark.unit

CONFIG = PPOConfig(
    rollout_batch=4,
    minibatches=2,
    epochs=2,
    max_new_tokens=4,
    ptx_batch=4,
    ptx_max_length=32,
    lora_r=2,
    lora_alpha=4,
    lr=1e-2,
)
INSTRUCTIONS = ["reverse: abc", "add: 1 + 2", "sort: cba", "capitalise: hi"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; two spin-wait when the CI box is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reward_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (non-zero) reward LoRA + head in adapters.save_adapter's format."""
    return random_reward_model(base_dir, tmp_path_factory.mktemp("rm") / "reward")


def build(base_dir: Path, reward_dir: Path, config: PPOConfig = CONFIG) -> SharedBaseModels:
    return SharedBaseModels.build(base_dir, reward_dir, config)


def prompts(models: SharedBaseModels) -> list[str]:
    return [chat_prompt(models.tokenizer, i) for i in INSTRUCTIONS]


def ptx_batch(models: SharedBaseModels) -> PtxBatch:
    rng = random.Random(0)
    return next(ptx_batches(models.tokenizer, pretraining_texts(rng, 8), 4, 32, rng))


def snapshot(models: SharedBaseModels) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in models.peft.named_parameters()}
    state |= {
        f"value_head.{n}": p.detach().clone() for n, p in models.value_head.named_parameters()
    }
    state |= {
        f"reward_head.{n}": p.detach().clone() for n, p in models.reward_head.named_parameters()
    }
    return state


def role(name: str) -> str:
    for adapter in ("policy", "value", "reward"):
        if f".{adapter}." in name or name.startswith(f"{adapter}_head."):
            return adapter
    return "base"


def run_step(models: SharedBaseModels, config: PPOConfig, ptx: PtxBatch | None, seed: int = 0):
    torch.manual_seed(seed)
    optimizer = make_optimizer(models, config)
    return ppo_step(models, optimizer, prompts(models), ptx, config, config.kl_controller())


def test_one_copy_of_the_base_weights_shared_by_every_role(
    base_dir: Path, reward_dir: Path
) -> None:
    models = build(base_dir, reward_dir)
    plain, _ = loading.load_base(base_dir)
    own = ("lora_", "modules_to_save.")  # adapters' weights, not the base's
    base = {n: p for n, p in models.peft.named_parameters() if not any(o in n for o in own)}
    # one base parameter per parameter of the plain model: no second copy for policy or value
    assert len(base) == len(list(plain.parameters()))
    assert len({p.data_ptr() for p in base.values()}) == len(
        {p.data_ptr() for p in plain.parameters()}
    )
    assert not any(p.requires_grad for p in base.values())
    q_proj = models.peft.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    adapters = {n.split(".")[1] for n, _ in q_proj.named_parameters() if n.startswith("lora_A")}
    assert adapters == {"policy", "value", "reward"}  # three adapters around one base_layer
    trainable = {id(p) for p in models.trainable_parameters()}
    assert {role(n) for n, p in models.peft.named_parameters() if id(p) in trainable} == {
        "policy",
        "value",
    }


def test_reference_logprobs_are_the_base_models_own(base_dir: Path, reward_dir: Path) -> None:
    models = build(base_dir, reward_dir)
    torch.manual_seed(0)
    rollout = collect_rollout(models, prompts(models), CONFIG, CONFIG.beta)
    plain, _ = loading.load_base(base_dir)
    positions = (rollout.attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = plain(
            input_ids=rollout.ids, attention_mask=rollout.attention, position_ids=positions
        ).logits
    logp = torch.log_softmax(logits[:, rollout.start - 1 : -1], -1)
    expected = logp.gather(-1, rollout.ids[:, rollout.start :, None]).squeeze(-1)
    assert torch.allclose(rollout.ref_logp, expected, atol=1e-5)
    # the policy starts as the base (LoRA B = 0), so the first rollout's KL is exactly 0
    assert torch.allclose(rollout.logp, rollout.ref_logp, atol=1e-5)


def test_a_step_trains_policy_and_value_only(base_dir: Path, reward_dir: Path) -> None:
    models = build(base_dir, reward_dir)
    torch.manual_seed(0)
    fixed = collect_rollout(models, prompts(models), CONFIG, CONFIG.beta)
    before = snapshot(models)
    run_step(models, CONFIG, ptx_batch(models))
    after = snapshot(models)
    changed = {role(n) for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"policy", "value"}
    with torch.no_grad():
        ref_after = models.reference_logprobs(fixed.ids, fixed.attention, fixed.start)
        policy_after = models.policy_logprobs(fixed.ids, fixed.attention, fixed.start)
    assert torch.equal(ref_after, fixed.ref_logp)
    assert not torch.allclose(policy_after, fixed.logp)


def test_gamma_zero_is_plain_ppo_bit_for_bit(
    base_dir: Path, reward_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = build(base_dir, reward_dir, dataclasses.replace(CONFIG, gamma_ptx=0.0))
    run_step(plain, plain.config, None)

    gamma_zero = build(base_dir, reward_dir, dataclasses.replace(CONFIG, gamma_ptx=0.0))

    def never(*_: object) -> torch.Tensor:
        raise AssertionError("the ptx batch was forwarded with gamma_ptx == 0")

    monkeypatch.setattr(gamma_zero, "pretraining_nll", never)
    stats = run_step(gamma_zero, gamma_zero.config, ptx_batch(gamma_zero))
    assert math.isnan(stats.ptx_loss)
    a, b = snapshot(plain), snapshot(gamma_zero)
    assert all(torch.equal(a[n], b[n]) for n in a)

    with_ptx = build(base_dir, reward_dir)  # gamma_ptx = 1: the control, which must differ
    run_step(with_ptx, CONFIG, ptx_batch(with_ptx))
    c = snapshot(with_ptx)
    assert any(not torch.equal(a[n], c[n]) for n in a if role(n) == "policy")


def restore(models: SharedBaseModels, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in models.peft.named_parameters():
            p.copy_(state[n])
        for n, p in models.value_head.named_parameters():
            p.copy_(state[f"value_head.{n}"])


def test_micro_batches_give_the_same_update(base_dir: Path, reward_dir: Path) -> None:
    models = build(base_dir, reward_dir)
    torch.manual_seed(0)
    rollout: Rollout = collect_rollout(models, prompts(models), CONFIG, CONFIG.beta)
    ptx = ptx_batch(models)
    start = snapshot(models)
    results = []
    for micro in (1, 2):
        restore(models, start)
        config = dataclasses.replace(CONFIG, micro_batches=micro)
        torch.manual_seed(1)  # the same minibatch shuffle
        optimise(models, make_optimizer(models, config), rollout, ptx, config)
        results.append(snapshot(models))
    one, two = results
    assert any(not torch.equal(one[n], start[n]) for n in one if role(n) == "policy")
    for n in one:
        assert torch.allclose(one[n], two[n], rtol=1e-4, atol=1e-6), n


def test_the_value_loss_does_not_scale_the_policy_update(base_dir: Path, reward_dir: Path) -> None:
    """Policy and value gradients are clipped apart: a value loss 1,000 times larger leaves
    the policy's step exactly as it was (a joint clip shrank it toward Adam's epsilon)."""
    models = build(base_dir, reward_dir, dataclasses.replace(CONFIG, max_grad_norm=1e-3))
    torch.manual_seed(0)
    rollout = collect_rollout(models, prompts(models), models.config, CONFIG.beta)
    start = snapshot(models)
    results = []
    for vf_coef in (0.5, 500.0):
        restore(models, start)
        config = dataclasses.replace(models.config, vf_coef=vf_coef)
        torch.manual_seed(1)
        optimise(models, make_optimizer(models, config), rollout, None, config)
        results.append(snapshot(models))
    small, large = results
    policy = [n for n in start if role(n) == "policy"]
    assert any(not torch.equal(small[n], start[n]) for n in policy)
    assert all(torch.equal(small[n], large[n]) for n in policy)
    assert any(not torch.equal(small[n], large[n]) for n in start if role(n) == "value")


def test_a_few_steps_run_end_to_end_with_finite_stats(base_dir: Path, reward_dir: Path) -> None:
    config = dataclasses.replace(CONFIG, adaptive_kl=True, kl_target=0.01, kl_horizon=10)
    models = build(base_dir, reward_dir, config)
    optimizer, kl_ctl = make_optimizer(models, config), config.kl_controller()
    ptx = ptx_batch(models)
    torch.manual_seed(0)
    history = [ppo_step(models, optimizer, prompts(models), ptx, config, kl_ctl) for _ in range(3)]
    for stats in history:
        assert all(math.isfinite(v) for v in stats), stats
        assert 1 <= stats.response_length <= config.max_new_tokens
        assert stats.samples_per_second > 0
    assert history[0].beta == config.beta
    assert kl_ctl.beta != config.beta  # the adaptive controller moved it


def test_k_samples_per_prompt_are_scored_against_each_other(
    base_dir: Path, reward_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = dataclasses.replace(
        CONFIG, rollout_batch=8, samples_per_prompt=2, beta=0.0, gae_gamma=1.0, gae_lambda=1.0
    )
    assert config.prompts_per_step == 4
    models = build(base_dir, reward_dir, config)
    seen: list[list[str]] = []
    scores = torch.tensor([3.0, 1.0, 0.0, 0.0, -2.0, 4.0, 5.0, 5.0])

    def rewards(prompts: list[str], responses: list[str]) -> torch.Tensor:
        seen.append(list(prompts))
        return scores

    monkeypatch.setattr(models, "rewards", rewards)
    torch.manual_seed(0)
    rollout = collect_rollout(models, [p for p in prompts(models) for _ in "ab"], config, 0.0)
    # with beta 0 and lambda = gamma = 1 every token's return is the sequence's final reward:
    # its score minus the other response's to the same prompt
    returns = torch.where(rollout.mask, rollout.returns, torch.nan)
    expected = torch.tensor([2.0, -2.0, 0.0, 0.0, -6.0, 6.0, 0.0, 0.0])
    assert torch.allclose(returns.nanmean(dim=1), expected, atol=1e-5)
    assert torch.equal(rollout.scores, scores)  # reported scores stay the reward model's own
    # ppo_step takes the distinct prompts and samples each one K times, side by side
    run_step(models, config, None)
    assert seen[-1] == [p for p in prompts(models) for _ in range(2)]


def test_the_policy_trains_its_own_final_norm_and_nothing_else_of_the_base(
    base_dir: Path, reward_dir: Path
) -> None:
    models = build(base_dir, reward_dir)
    norm = models.peft.get_submodule("base_model.model.model.norm")
    base_norm = norm.original_module.weight.detach().clone()
    (policy_norm,) = models.policy_norm
    assert torch.equal(policy_norm, base_norm)  # a copy: the policy starts as the SFT model
    optimizer = make_optimizer(models, CONFIG)
    assert [g["lr"] for g in optimizer.param_groups] == [CONFIG.lr, CONFIG.final_norm_lr]
    torch.manual_seed(0)
    fixed = collect_rollout(models, prompts(models), CONFIG, CONFIG.beta)
    run_step(models, CONFIG, ptx_batch(models))
    assert not torch.equal(policy_norm, base_norm)
    assert torch.equal(norm.original_module.weight, base_norm)
    # the reference, reward and value roles still read the base's norm
    with torch.no_grad():
        ref = models.reference_logprobs(fixed.ids, fixed.attention, fixed.start)
    assert torch.equal(ref, fixed.ref_logp)
    lora_only = dataclasses.replace(CONFIG, final_norm_lr=0.0)
    assert build(base_dir, reward_dir, lora_only).policy_norm == []


def test_saved_policy_loads_with_plain_peft(
    base_dir: Path, reward_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    models = build(base_dir, reward_dir)
    run_step(models, CONFIG, ptx_batch(models))
    out = save_policy(models, tmp_path / "policy", base_dir)
    assert json.loads((out / adapters.FLYWHEEL_META).read_text()) == {
        "base_model": loading.base_fingerprint(base_dir)
    }
    plain, _ = loading.load_base(base_dir)
    loaded = PeftModel.from_pretrained(plain, str(out))
    ids = models.tokenizer(prompts(models), padding=True, return_tensors="pt")["input_ids"][:, -6:]
    attention = torch.ones_like(ids)
    with torch.no_grad():
        expected = models.policy_logprobs(ids, attention, 1)
        logits = loaded(input_ids=ids, attention_mask=attention).logits[:, :-1]
    got = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_response_mask_stops_after_the_first_eos() -> None:
    tokens = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 9, 0]])
    assert response_mask(tokens, eos_id=2).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]


def test_pretraining_texts_from_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one doc\nstill one\n\nsecond doc\n")
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n')
    assert read_pretraining_texts(tmp_path / "a.txt") == ["one doc\nstill one", "second doc"]
    assert read_pretraining_texts(tmp_path / "b.txt") == ["line one", "line two"]
    assert read_pretraining_texts(tmp_path / "c.jsonl") == ["x", "y"]
    (tmp_path / "u.jsonl").write_text('{"text": "a\u2028b"}\r\n', encoding="utf-8")
    assert read_pretraining_texts(tmp_path / "u.jsonl") == ["a\u2028b"]  # one record, not two
    with pytest.raises(ValueError, match=r"d\.jsonl:2 must be an object with a string \"text\""):
        read_pretraining_texts(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match=r"must be a \.txt or \.jsonl file, got e\.csv"):
        read_pretraining_texts(tmp_path / "e.csv")


def test_ptx_batches_are_right_padded_and_end_with_eos(base_dir: Path) -> None:
    _, tokenizer = loading.load_base(base_dir)
    rng = random.Random(0)
    batches = ptx_batches(tokenizer, pretraining_texts(rng, 5), 4, 64, rng)
    seen = [next(batches) for _ in range(3)]  # 12 rows from 5 texts: reshuffled passes
    for batch in seen:
        lengths = batch.attention_mask.sum(dim=1)
        assert batch.input_ids.shape[0] == 4
        assert (batch.input_ids[torch.arange(4), lengths - 1] == tokenizer.eos_token_id).all()
        assert (batch.attention_mask.cumsum(1)[:, -1] == lengths).all()
        assert (batch.loss_mask <= batch.attention_mask.bool()).all()


def test_ptx_scores_whole_documents_but_only_the_continuation_of_pairs(base_dir: Path) -> None:
    _, tokenizer = loading.load_base(base_dir)
    rng = random.Random(0)
    context = len(tokenizer("add: 1 + 2\n", add_special_tokens=False)["input_ids"])
    pair = next(ptx_batches(tokenizer, [("add: 1 + 2\n", "3")], 1, 64, rng))
    doc = next(ptx_batches(tokenizer, ["add: 1 + 2\n3"], 1, 64, rng))
    assert pair.loss_mask[0].tolist() == [False] * context + [True] * (
        pair.input_ids.shape[1] - context
    )
    assert doc.loss_mask.equal(doc.attention_mask.bool())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"clip": 0}, "clip must be > 0, got 0"),
        ({"gamma_ptx": -1.0}, "gamma_ptx must be >= 0, got -1.0"),
        ({"gae_lambda": 1.5}, "gae_lambda must be between 0 and 1, got 1.5"),
        ({"kl_estimator": "k4"}, "kl_estimator must be 'k1', 'k2' or 'k3', got 'k4'"),
        ({"rollout_batch": 10, "minibatches": 4}, r"rollout_batch \(10\) must be divisible"),
        (
            {"rollout_batch": 8, "minibatches": 4, "micro_batches": 3},
            r"micro_batches \(3\) must be <= the rows of a minibatch "
            r"\(rollout_batch / minibatches = 2\)",
        ),
        ({"adaptive_kl": True, "beta": 0.0}, "adaptive_kl needs beta > 0"),
        (
            {"rollout_batch": 8, "minibatches": 2, "samples_per_prompt": 3},
            r"rollout_batch \(8\) must be divisible by samples_per_prompt \(3\)",
        ),
        ({"micro_batches": 8, "ptx_batch": 4}, r"micro_batches \(8\) must be <= ptx_batch \(4\)"),
    ],
)
def test_config_rejects_bad_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PPOConfig(**fields)


def test_the_gate_s_pretraining_losses_are_the_policy_s_and_the_bare_base_s(
    base_dir: Path, reward_dir: Path
) -> None:
    """After a PPO-ptx step has moved the policy (LoRA and its own final norm), the gate's base
    figure is the NLL of the base model loaded alone, and its candidate figure the policy's."""
    from flywheel_learner.loop import pretraining_losses
    from flywheel_learner.ppo_math import ptx_loss

    models = build(base_dir, reward_dir)
    batch = ptx_batch(models)
    run_step(models, CONFIG, batch)
    candidate, base = pretraining_losses(models, batch)
    bare, _ = loading.load_base(base_dir)
    with torch.no_grad():
        logits = bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    alone = float(ptx_loss(logits[:, :-1], batch.input_ids[:, 1:], batch.loss_mask[:, 1:]))
    assert base == pytest.approx(alone, rel=1e-5)
    assert candidate == pytest.approx(float(models.pretraining_nll(batch)), rel=1e-6)
    assert abs(candidate - base) > 1e-4  # the step moved the policy off the base
