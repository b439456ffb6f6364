import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from flywheel_demo.task import demonstrations
from flywheel_demo.tokenizer import train_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"<|user|>\n{i}\n<|assistant|>\n{r}" for i, r in demonstrations(random.Random(0), 300)]
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(saved: Path):
    return AutoTokenizer.from_pretrained(saved, local_files_only=True)


def test_special_tokens_survive_save_and_load(tokenizer) -> None:
    assert tokenizer.bos_token == "<|bos|>"
    assert tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token == "<|pad|>"
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and None not in ids
    for role in ("system", "user", "assistant"):
        assert len(tokenizer(f"<|{role}|>", add_special_tokens=False)["input_ids"]) == 1


def test_letters_and_digits_of_task_words_are_single_tokens(tokenizer) -> None:
    ids = tokenizer("reverse: hello", add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[-5:] == ["h", "e", "l", "l", "o"]
    digits = tokenizer("add: 12 + 7", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in digits[-6:]] == ["1", "2", " ", "+", " ", "7"]


@pytest.mark.parametrize(
    "text", ["olleh", "add: 12 + 7", "HELLO world\n  two  spaces", "héllo wörld ✓", "sort: 3912"]
)
def test_decode_gives_back_the_exact_text(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    if text.isascii():  # streaming decodes token by token: no spaces may appear between them
        assert "".join(tokenizer.decode([i]) for i in ids) == text


def test_decode_skips_special_tokens_cleanly(tokenizer) -> None:
    ids = [*tokenizer("olleh", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "olleh"


def test_no_bos_is_added_implicitly(tokenizer) -> None:
    """The chat template writes the bos; tokenising the rendered prompt must not add another."""
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_chat_template_renders_the_generation_prompt(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "reverse: abc"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nbe brief\n<|user|>\nreverse: abc\n<|assistant|>\n"


def test_chat_template_ends_assistant_turns_with_eos(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "reverse: abc"},
        {"role": "assistant", "content": "cba"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|user|>\nreverse: abc\n<|assistant|>\ncba<|eos|>\n"


def test_rejects_a_vocab_too_small_for_the_byte_alphabet() -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 262"):
        train_tokenizer(["abc"], vocab_size=100)
