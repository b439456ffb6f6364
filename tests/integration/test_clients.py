"""Clients people point at an OpenAI-compatible server, none written here (issue 19)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.both_backends
def test_langchain_chat_openai_streams_a_chat(server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"{server.http}/v1", api_key="unused", model="policy", max_tokens=6,
        temperature=0, max_retries=0, timeout=120,
    )  # fmt: skip
    chunks = list(chat.stream("add: 2 + 2"))
    assert len(chunks) >= 2  # streamed, not one piece
    streamed = "".join(str(c.content) for c in chunks)
    whole = chat.invoke("add: 2 + 2")
    assert streamed == whole.content and streamed  # greedy: the same text both ways
    assert whole.response_metadata["finish_reason"] in ("stop", "length")
