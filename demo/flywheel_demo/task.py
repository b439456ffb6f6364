"""The built-in synthetic instruction task: prompts, demonstrations and answers from code.

Four sub-tasks a small model can learn character by character, each with a checkable answer,
so a scripted labeler can rank completions and anyone can watch the policy improve:

    reverse: hello      -> olleh
    sort: dbca          -> abcd        (letters or digits, ascending)
    add: 12 + 7         -> 19
    capitalise: hello   -> HELLO
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

TASKS = ("reverse", "sort", "add", "capitalise")
MIN_WORD, MAX_WORD = 3, 5
# Sums up to 20 + 20: a model this small learns them within the build budget (it stays near 0%
# on two-digit carries), so every sub-task leaves PPO some right answers to reinforce.
MAX_ADDEND = 20

# The last instruction in the text wins: a chat-rendered prompt may hold earlier turns.
_INSTRUCTION = re.compile(
    r"\b(?:(?P<task>reverse|capitalise): (?P<word>[a-z]+)"
    r"|sort: (?P<chars>[a-z]+|[0-9]+)"
    r"|add: (?P<a>\d{1,3}) \+ (?P<b>\d{1,3}))(?![a-z0-9])"
)


@dataclass(frozen=True)
class Example:
    task: str
    instruction: str  # the user message, e.g. "reverse: hello"
    answer: str  # the one correct response, e.g. "olleh"


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_WORD, MAX_WORD)))


def _solve(task: str, argument: str) -> str:
    if task == "reverse":
        return argument[::-1]
    if task == "sort":
        return "".join(sorted(argument))
    if task == "capitalise":
        return argument.upper()
    a, b = argument.split(" + ")
    return str(int(a) + int(b))


def _example(task: str, argument: str) -> Example:
    return Example(task, f"{task}: {argument}", _solve(task, argument))


def sample_example(rng: random.Random, task: str | None = None) -> Example:
    """A fresh random example of `task` (or of a task drawn uniformly)."""
    if task is None:
        task = rng.choice(TASKS)
    if task in ("reverse", "capitalise"):
        return _example(task, _word(rng))
    if task == "sort":
        if rng.random() < 0.5:
            return _example(task, _word(rng))
        digits = "".join(rng.choices(string.digits, k=rng.randint(MIN_WORD, MAX_WORD)))
        return _example(task, digits)
    if task == "add":
        return _example(task, f"{rng.randint(0, MAX_ADDEND)} + {rng.randint(0, MAX_ADDEND)}")
    raise ValueError(f"unknown demo task {task!r}; choose one of {', '.join(TASKS)}")


def pretraining_document(rng: random.Random) -> str:
    """A line of the demo's pretraining corpus: a word or number said two to four times.

    The demo base learns these as plain text (every token scored) before its SFT, and the ptx
    term keeps them. They hold no instruction and no answer, so no labeler's preference over
    answers pulls against them (issue 15: a corpus of correct answers held the policy to the
    demo's own notion of "correct" whatever the users ranked). After the first word the rest
    is predictable by copying, the skill every task needs; lines of unpredictable letters
    taught the model to ignore its context and its SFT then reached 9% accuracy, not 79%.
    """
    word = _word(rng) if rng.random() < 0.7 else str(rng.randint(0, 999))
    return " ".join([word] * rng.randint(2, 4))


def pretraining_texts(rng: random.Random, n: int) -> list[str]:
    """The demo's pretraining corpus: `n` fresh documents, as the demo build mixed into its SFT.

    Words said a few times, every token scored. They carry no answer, so the ptx term protects
    the base's language modelling without favouring any preference over answers (issue 15: a
    corpus of correct answers fought every labeler who did not prefer them, and the gate's
    pretraining-loss check refused their policies).
    """
    return [pretraining_document(rng) for _ in range(n)]


def parse(prompt: str) -> Example | None:
    """The last demo instruction found anywhere in `prompt` (bare or chat-rendered)."""
    matches = list(_INSTRUCTION.finditer(prompt))
    if not matches:
        return None
    m = matches[-1]
    if m["task"]:
        return _example(m["task"], m["word"])
    if m["chars"]:
        return _example("sort", m["chars"])
    return _example("add", f"{int(m['a'])} + {int(m['b'])}")


def check(prompt: str, response: str) -> bool | None:
    """True if `response` answers the demo instruction in `prompt`, None if there is none."""
    example = parse(prompt)
    if example is None:
        return None
    return response.strip() == example.answer


def _swap_adjacent(text: str, rng: random.Random) -> str:
    i = rng.randrange(len(text) - 1)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def _change_one(text: str, rng: random.Random, alphabet: str) -> str:
    i = rng.randrange(len(text))
    return text[:i] + rng.choice(alphabet.replace(text[i], "")) + text[i + 1 :]


def _wrong_candidates(example: Example, rng: random.Random) -> list[str]:
    """Mistakes a half-trained model makes on this example (some may equal the answer)."""
    answer, argument = example.answer, example.instruction.split(": ", 1)[1]
    if example.task == "add":
        a, b = (int(x) for x in argument.split(" + "))
        total = a + b
        return [str(total + 1), str(max(total - 1, 0)), str(total + 10), str(abs(a - b))]
    alphabet = string.ascii_uppercase if example.task == "capitalise" else string.ascii_lowercase
    if answer.isdigit():
        alphabet = string.digits
    mistakes = [_swap_adjacent(answer, rng), _change_one(answer, rng, alphabet), answer[:-1]]
    if example.task == "reverse":
        half = len(argument) // 2
        mistakes += [argument, argument[half:][::-1] + argument[:half]]  # partly reversed
    elif example.task == "sort":
        mistakes += [argument]
    else:
        mistakes += [argument, answer[0] + argument[1:]]  # "Hello"-style half capitalised
    return mistakes


def wrong_answer(example: Example, rng: random.Random) -> str:
    """A plausible but wrong response to `example` (never the correct answer)."""
    wrong = [w for w in _wrong_candidates(example, rng) if w and w != example.answer]
    if not wrong:  # e.g. "aaa": every letter-level mistake above is a no-op
        return example.answer + example.answer[-1]
    return rng.choice(wrong)


def demonstrations(rng: random.Random, n: int, quality: float = 0.7) -> list[tuple[str, str]]:
    """(instruction, response) pairs, a `quality` share of them correct.

    Mixed quality on purpose: the SFT policy comes out imperfect, which leaves preference
    learning (reward model + PPO) something to improve.
    """
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must be between 0 and 1, got {quality}")
    pairs = []
    for _ in range(n):
        example = sample_example(rng)
        good = rng.random() < quality
        pairs.append((example.instruction, example.answer if good else wrong_answer(example, rng)))
    return pairs


def preference_pairs(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """(instruction, chosen = correct, rejected = plausible wrong) triples."""
    pairs = []
    for _ in range(n):
        example = sample_example(rng)
        pairs.append((example.instruction, example.answer, wrong_answer(example, rng)))
    return pairs
