"""Next-token sampling as pure functions: filters, greedy/sampled rows, seeds, stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel_server.sampling import (
    adjust_logits,
    filter_logits,
    find_stop,
    forbid_token,
    safe_prefix_length,
    sample,
)

pytestmark = pytest.mark.unit

NEG_INF = float("-inf")


def _row(*probs: float) -> torch.Tensor:
    """Logits whose softmax is exactly `probs` (up to float rounding). -> (1, V)"""
    return torch.tensor([[math.log(p) for p in probs]])


def _kept(filtered: torch.Tensor) -> list[list[bool]]:
    return torch.isfinite(filtered).tolist()


# -- filter_logits ---------------------------------------------------------------------------


def test_top_k_1_keeps_only_the_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 4.0, 3.0]])
    out = filter_logits(logits, torch.tensor([1, 1]), torch.tensor([1.0, 1.0]))
    assert _kept(out) == [[False, True, False, False], [True, False, False, False]]
    # The kept logit keeps its value; nothing is renormalised here.
    assert out[0, 1].item() == 2.0
    assert out[1, 0].item() == 5.0


def test_top_k_2_keeps_the_two_largest_in_their_original_positions() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    out = filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert out.tolist() == [[NEG_INF, 3.0, NEG_INF, 2.0]]


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        # probs 0.5, 0.3, 0.2: the smallest prefix reaching p.
        (0.5, [True, False, False]),  # 0.5 alone reaches 0.5
        (0.6, [True, True, False]),  # 0.5 < 0.6 <= 0.8
        (0.8, [True, True, False]),  # 0.5 + 0.3 reaches 0.8 exactly
        (0.81, [True, True, True]),
        (0.1, [True, False, False]),  # the first token is always kept
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p: float, kept: list[bool]) -> None:
    out = filter_logits(_row(0.5, 0.3, 0.2), torch.tensor([0]), torch.tensor([top_p]))
    assert _kept(out) == [kept]


def test_top_p_works_on_unsorted_logits() -> None:
    # probs 0.2, 0.5, 0.3 in vocabulary order: top_p=0.6 keeps tokens 1 and 2.
    out = filter_logits(_row(0.2, 0.5, 0.3), torch.tensor([0]), torch.tensor([0.6]))
    assert _kept(out) == [[False, True, True]]


def test_rows_use_their_own_top_k_and_top_p() -> None:
    logits = torch.cat([_row(0.5, 0.3, 0.2), _row(0.5, 0.3, 0.2), _row(0.5, 0.3, 0.2)])
    out = filter_logits(logits, torch.tensor([0, 2, 1]), torch.tensor([0.6, 1.0, 1.0]))
    assert _kept(out) == [[True, True, False], [True, True, False], [True, False, False]]


def test_top_k_and_top_p_combine_as_the_stricter_of_the_two() -> None:
    # top_p=0.81 alone keeps all three; top_k=2 drops the third.
    out = filter_logits(_row(0.5, 0.3, 0.2), torch.tensor([2]), torch.tensor([0.81]))
    assert _kept(out) == [[True, True, False]]


def test_top_k_0_and_top_p_1_is_a_no_op() -> None:
    logits = torch.tensor([[0.3, -1.2, 2.5, 0.0, 1.1], [4.0, 4.0, -3.0, 0.5, 2.0]])
    out = filter_logits(logits, torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    assert torch.equal(out, logits)


def test_top_p_1_keeps_a_very_unlikely_token() -> None:
    logits = torch.tensor([[0.0, -20.0]])  # p(token 1) = 2e-9
    out = filter_logits(logits, torch.tensor([0]), torch.tensor([1.0]))
    assert torch.equal(out, logits)


# -- sample -------------------------------------------------------------------------------------


def test_temperature_0_rows_are_greedy_while_other_rows_sample() -> None:
    # Every row prefers token 0 only slightly, so sampled rows pick token 1 about half the time.
    rows = 64
    logits = torch.tensor([[0.1, 0.0]]).expand(rows, 2).clone()
    temperature = torch.tensor([0.0, 1.0] * (rows // 2))
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(rows)]
    out = sample(logits, temperature, torch.zeros(rows, dtype=torch.long), torch.ones(rows), gens)
    assert out.dtype == torch.int64
    assert out.shape == (rows,)
    assert out[0::2].tolist() == [0] * (rows // 2)
    sampled = out[1::2].tolist()
    assert set(sampled) == {0, 1}


def test_temperature_0_is_greedy_even_when_filters_are_set() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    out = sample(logits, torch.tensor([0.0]), torch.tensor([2]), torch.tensor([0.5]), [None])
    assert out.tolist() == [1]


def test_sampling_never_draws_a_filtered_token() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0, 1.8]]).expand(50, 4).clone()
    gens = [torch.Generator().manual_seed(i) for i in range(50)]
    out = sample(
        logits, torch.ones(50), torch.full((50,), 2, dtype=torch.long), torch.ones(50), gens
    )
    assert set(out.tolist()) <= {0, 1}
    assert set(out.tolist()) == {0, 1}


def test_the_same_seeded_generator_gives_the_same_draws() -> None:
    logits = torch.zeros(4, 10)  # uniform over 10 tokens

    def draws(seed: int) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(4)]
        return [
            sample(
                logits, torch.ones(4), torch.zeros(4, dtype=torch.long), torch.ones(4), gens
            ).tolist()
            for _ in range(8)
        ]

    first = draws(7)
    assert first == draws(7)
    assert first != draws(8)
    # Uniform draws over 8 steps x 4 rows are not all the same token.
    assert len({t for step in first for t in step}) > 1


# -- stop strings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello END world STOP", ("STOP", "END"), 6),
        ("hello END world STOP", ("END", "STOP"), 6),
        ("abcabc", ("c",), 2),
        ("no stop here", ("END",), -1),
        ("anything", (), -1),
        ("", ("x",), -1),
        ("xEND", ("END", "xE"), 0),
    ],
)
def test_find_stop_picks_the_earliest_stop(
    text: str, stops: tuple[str, ...], expected: int
) -> None:
    assert find_stop(text, stops) == expected


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("abc<|", ("<|end|>",), 3),  # "<|" may become "<|end|>": hold it back
        ("abc<|end|", ("<|end|>",), 3),
        ("abc<", ("<|end|>",), 3),
        ("abc", ("<|end|>",), 3),  # no partial match: everything may go
        ("abc|>", ("<|end|>",), 5),  # a suffix of the stop, not a prefix
        ("", ("<|end|>",), 0),
        ("abc<|", (), 5),
        ("xx<", ("<|end|>", "x<y"), 1),  # the longest hold over all stops ("x<")
        ("ab", ("abcdef",), 0),  # the whole text may be the start of a stop
    ],
)
def test_safe_prefix_length_holds_back_a_partial_stop(
    text: str, stops: tuple[str, ...], expected: int
) -> None:
    assert safe_prefix_length(text, stops) == expected


def test_a_top_p_below_float32s_range_keeps_the_most_likely_token() -> None:
    """1e-46 arrives as 0.0 in float32: every token would be dropped, and sampling gives NaN."""
    logits = torch.tensor([[0.5, 2.0, 1.0]])
    top_p = torch.tensor([1e-46], dtype=torch.float32)
    assert top_p.item() == 0.0
    filtered = filter_logits(logits, torch.tensor([0]), top_p)
    assert filtered[0].isfinite().tolist() == [False, True, False]
    assert sample(logits, torch.tensor([1.0]), torch.tensor([0]), top_p, [None]).item() == 1


def test_forbid_token_masks_it_only_in_the_rows_asked() -> None:
    logits = torch.tensor([[3.0, 1.0], [3.0, 1.0]])
    out = forbid_token(logits, 0, [True, False])
    assert out[0].tolist() == [-math.inf, 1.0] and out[1].tolist() == [3.0, 1.0]
    assert logits[0, 0] == 3.0  # the caller's logits are left alone
    assert forbid_token(logits, 0, [False, False]) is logits
    assert forbid_token(logits, None, [True, True]) is logits  # a tokenizer without eos
    greedy = sample(
        out, torch.tensor([0.0, 0.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), [None, None]
    )
    assert greedy.tolist() == [1, 0]


def test_penalties_and_logit_bias_follow_openais_definition() -> None:
    from flywheel_server.domain import Sampling

    logits = torch.zeros(3, 4)
    rows = [
        ([1, 1, 2], Sampling(presence_penalty=0.5, frequency_penalty=0.25)),
        ([1, 1, 2], Sampling(logit_bias=((0, 3.0), (3, -100.0)))),
        ([1], Sampling()),
    ]
    out = adjust_logits(logits, rows)
    # token 1 twice: 0.5 + 2 x 0.25; token 2 once: 0.5 + 0.25; tokens 0 and 3 never
    assert out[0].tolist() == [0.0, -1.0, -0.75, 0.0]
    assert out[1].tolist() == [3.0, 0.0, 0.0, -100.0]
    assert out[2].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adjust_logits(logits, [([1], Sampling())] * 3) is logits  # nothing asked: no copy
    assert logits.eq(0).all()
