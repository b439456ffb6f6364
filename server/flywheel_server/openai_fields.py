"""Which OpenAI request fields the HTTP routes take without using (issue 19).

A field that would change what is generated is either honoured (declared on the request
model) or refused with a 400 that names it: a server that silently drops `logprobs` or
`presence_penalty` changes a caller's results behind its back. Pure: a JSON body in, the first
field it cannot serve (and why) out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

# Fields that change nothing in what is generated: taken and not used.
PASSIVE = frozenset({"metadata", "store", "service_tier", "parallel_tool_calls"})


def _is(value: object) -> Callable[[Any], bool]:
    # `is` for booleans (0 == False in Python), == for the rest.
    return (lambda v: v is value) if isinstance(value, bool) else (lambda v: v == value)


# Fields that would change the result, taken only at the value that changes nothing (what a
# client sends when it spells out the default). null is always that value.
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "repetition_penalty": _is(1),
    "logprobs": _is(False),
    "top_logprobs": _is(0),
    "echo": _is(False),
    "best_of": _is(1),
    "suffix": _is(""),
    "min_p": _is(0),
    "response_format": _is({"type": "text"}),
    "tools": _is([]),
    "tool_choice": _is("none"),
    "functions": _is([]),
    "function_call": _is("none"),
    "modalities": _is(["text"]),
}


def unsupported(body: Mapping[str, Any], declared: Collection[str]) -> tuple[str, str] | None:
    """(field, message) for the first field of `body` this server would have to ignore to
    answer, or None. `declared`: the fields the route honours."""
    for name, value in body.items():
        if name in declared or name in PASSIVE or value is None:
            continue
        neutral = NEUTRAL.get(name)
        if neutral is None:
            return name, f"{name} is not an OpenAI field this server knows; leave it out"
        if not neutral(value):
            return name, (
                f"{name} is not supported by this server (got {value!r:.60}); leave it out or "
                "send its default, rather than get a result made without it"
            )
    return None
