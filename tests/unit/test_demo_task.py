import random

import pytest

from flywheel_demo import task as demo_task
from flywheel_demo.task import Example, check, demonstrations, preference_pairs

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("instruction", "answer"),
    [
        ("reverse: hello", "olleh"),
        ("sort: dbca", "abcd"),
        ("sort: 3912", "1239"),
        ("add: 12 + 7", "19"),
        ("capitalise: hello", "HELLO"),
    ],
)
def test_check_knows_each_task(instruction: str, answer: str) -> None:
    assert check(instruction, answer) is True
    assert check(instruction, f"  {answer}\n") is True
    assert check(instruction, answer + "x") is False


def test_check_finds_the_instruction_in_a_chat_rendered_prompt() -> None:
    prompt = "<|bos|><|user|>\nadd: 12 + 7\n<|assistant|>\n"
    assert check(prompt, "19") is True
    assert check(prompt, "20") is False


def test_check_uses_the_last_instruction_of_a_conversation() -> None:
    prompt = (
        "<|user|>\nreverse: abc\n<|assistant|>\ncba<|eos|>\n<|user|>\nreverse: xyz\n<|assistant|>\n"
    )
    assert check(prompt, "zyx") is True
    assert check(prompt, "cba") is False


@pytest.mark.parametrize("prompt", ["hello there", "reverse:", "add: 1 +", "REVERSE: abc", ""])
def test_check_returns_none_without_a_demo_instruction(prompt: str) -> None:
    assert check(prompt, "anything") is None


def test_sampled_examples_are_self_consistent() -> None:
    rng = random.Random(0)
    for task in demo_task.TASKS:
        for _ in range(50):
            example = demo_task.sample_example(rng, task)
            assert example.task == task
            assert check(example.instruction, example.answer) is True


def test_sample_example_rejects_an_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown demo task 'divide'"):
        demo_task.sample_example(random.Random(0), "divide")


def test_wrong_answer_is_never_right_even_for_repeated_letters() -> None:
    rng = random.Random(1)
    for example in [Example("reverse", "reverse: aaa", "aaa"), Example("sort", "sort: 111", "111")]:
        assert check(example.instruction, demo_task.wrong_answer(example, rng)) is False
    for _ in range(500):
        example = demo_task.sample_example(rng)
        wrong = demo_task.wrong_answer(example, rng)
        assert wrong and check(example.instruction, wrong) is False


def test_demonstrations_have_the_requested_quality() -> None:
    pairs = demonstrations(random.Random(2), 2000, quality=0.7)
    share = sum(bool(check(i, r)) for i, r in pairs) / len(pairs)
    assert 0.65 < share < 0.75
    assert all(check(i, r) for i, r in demonstrations(random.Random(3), 100, quality=1.0))


def test_demonstrations_reject_a_quality_outside_zero_one() -> None:
    with pytest.raises(ValueError, match=r"quality must be between 0 and 1, got 1\.5"):
        demonstrations(random.Random(0), 1, quality=1.5)


def test_preference_pairs_put_the_correct_answer_first() -> None:
    for instruction, chosen, rejected in preference_pairs(random.Random(4), 200):
        assert check(instruction, chosen) is True
        assert check(instruction, rejected) is False
