"""The reward model's score: last-token head plus a learned weight on the response likelihood."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flywheel_demo.model import build_tiny_model
from flywheel_model import adapters, loading, scoring
from flywheel_model.scoring import make_batch, score_batch

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return loading.load_base(build_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_reward_tokens_mark_where_the_response_starts(tiny: tuple) -> None:
    _, tok = tiny
    prompt_ids = tok("q: abc\n", add_special_tokens=False)["input_ids"]

    def tokens(max_length: int) -> tuple[list[int], int]:
        (got,) = scoring.reward_tokens(tok, [("q: abc\n", "xyz")], max_length)
        return got

    ids, start = tokens(256)
    assert ids[-1] == tok.eos_token_id
    assert start == len(prompt_ids)
    assert ids[:start] == prompt_ids
    # Truncated from the left: the start moves with the cut, the response stays whole.
    short, cut_start = tokens(len(ids) - 2)
    assert short == ids[2:] and cut_start == start - 2
    # A prompt cut away entirely still leaves one token of context before what is scored.
    tail, tail_start = tokens(2)
    assert tail == ids[-2:] and tail_start == 1


def test_reward_tokens_of_a_list_equal_those_of_each_item_alone(tiny: tuple) -> None:
    _, tok = tiny
    texts = [("q: abc\n", "xyz"), ("question two\n", "a longer answer"), ("q: abc\n", "x")]
    alone = [scoring.reward_tokens(tok, [t], 8)[0] for t in texts]
    assert scoring.reward_tokens(tok, texts, 8) == alone
    assert scoring.reward_tokens(tok, [], 8) == []


def test_score_adds_the_weighted_mean_log_likelihood_of_the_response(tiny: tuple) -> None:
    model, tok = tiny
    rankings = [("q: abc\n", [["xyz"], ["x"]]), ("question two\n", [["a longer answer"]])]
    batch = make_batch(tok, rankings, max_length=64)  # right-padded rows of unequal length
    torch.manual_seed(0)
    head = scoring.ScoreHead(model.config.hidden_size, likelihood=0.7)
    with torch.no_grad():
        got = score_batch(model, head, batch)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    output_hidden_states=True)  # fmt: skip
        logp = torch.log_softmax(out.logits, dim=-1)
        want = []
        for row in range(batch.input_ids.shape[0]):
            length = int(batch.attention_mask[row].sum())
            start = int(batch.starts[row])
            tokens = [
                float(logp[row, t - 1, batch.input_ids[row, t]]) for t in range(start, length)
            ]
            last = float(head(out.hidden_states[-1][row, length - 1]))
            want.append(last + 0.7 * sum(tokens) / len(tokens))
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    # The likelihood weight learns with the rest of the head.
    score_batch(model, head, batch).sum().backward()
    assert head.likelihood.grad is not None and float(head.likelihood.grad) != 0.0


def test_head_saves_its_likelihood_weight_and_older_heads_load_without_one(
    tiny: tuple, tmp_path: Path
) -> None:
    model, _ = tiny
    hidden = model.config.hidden_size
    head = scoring.ScoreHead(hidden, likelihood=0.25)
    head.save(tmp_path)
    assert scoring.ScoreHead.load(tmp_path, hidden).likelihood.item() == 0.25
    # A head saved before the weight existed scores from the last token alone, as it did.
    save_file({k: v.contiguous() for k, v in head.linear.state_dict().items()},
              str(tmp_path / adapters.SCORE_HEAD))  # fmt: skip
    assert scoring.ScoreHead.load(tmp_path, hidden).likelihood.item() == 0.0
