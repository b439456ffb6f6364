import pytest

from flywheel_server.openai_fields import unsupported

pytestmark = pytest.mark.unit

DECLARED = {"prompt", "temperature", "max_tokens", "user"}


def test_declared_passive_null_and_default_fields_are_taken() -> None:
    body = {"prompt": "x", "temperature": 2.0, "user": "u", "store": False, "logprobs": None,
            "echo": False, "tools": [],
            "response_format": {"type": "text"}, "best_of": 1}  # fmt: skip
    assert unsupported(body, DECLARED) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "logprobs": 0}, "logprobs"),  # 0 asks for the chosen tokens' log-probs
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
        ({"prompt": "x", "min_p": 0.1}, "min_p"),
        ({"prompt": "x", "tools": [{"type": "function"}]}, "tools"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "temprature": 0.5}, "temprature"),
    ],
)
def test_a_field_that_would_change_the_result_is_named(body: dict, field: str) -> None:
    problem = unsupported(body, DECLARED)
    assert problem is not None and problem[0] == field and field in problem[1]
