"""Token log-probabilities in OpenAI's two shapes (issue 19). Pure: TokenLogprobs in, JSON out.

    completions   {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}
    chat          {"content": [{"token", "logprob", "bytes", "top_logprobs": [{...}]}]}

A streamed completion sends the entries of each chunk's tokens with that chunk; `text_offset`
counts characters from the start of the completion's text. With `echo`, the prompt's tokens come
first, its first token with a null log-probability (nothing comes before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flywheel_server.engine_api import TokenLogprob


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The completions route's shape; `offset`: characters of the text before these tokens."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat route's shape."""
    return {
        "content": [
            {**_token(e.token, e.logprob), "top_logprobs": [_token(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def _token(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
