"""The labeling queue over HTTP, with auth on: tasks from a prompt file, typed by a labeler and
from logged traffic; reservations, shared tasks, skips; the labeler a ranking is stored under."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness import ServerProcess
from tests.support import FLYWHEEL, LABELING_KEYS, labeling_server

pytestmark = pytest.mark.integration

ADMIN, ANN, BOB = (LABELING_KEYS[name] for name in ("ops", "ann", "bob"))


@pytest.fixture(scope="module")
def queue(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Every queued prompt goes to two labelers: the agreement share, made certain.
    proc = labeling_server(tiny_model, tmp_path_factory.mktemp("labeling"),
                           "--task-shared-share", "1", "--task-candidates", "3")  # fmt: skip
    yield proc
    proc.stop()


def call(server: ServerProcess, path: str, body: dict[str, Any], key: str) -> tuple[int, Any]:
    return server.post(path, body, {"authorization": f"Bearer {key}"})


def next_task(server: ServerProcess, key: str) -> dict[str, Any] | None:
    status, body = call(server, "/v1/tasks/next", {}, key)
    assert status == 200, body
    return body["task"]


def get(server: ServerProcess, path: str, key: str) -> Any:
    request = urllib.request.Request(server.http + path, headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def stored(server: ServerProcess, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(server.data_dir / "flywheel.db") as db:
        return db.execute(sql).fetchall()


def test_the_queue_from_a_prompt_file_to_rankings(queue: ServerProcess) -> None:
    prompts = {"prompts": ["reverse: abc", "sort: cba", "reverse: abc"]}
    assert call(queue, "/v1/tasks", prompts, ANN)[0] == 403  # labelers do not fill the queue
    assert call(queue, "/v1/tasks", prompts, ADMIN) == (201, {"added": 2, "duplicates": 1})

    first = next_task(queue, ANN)
    assert first is not None and first["prompt"] == "reverse: abc" and first["shared"]
    assert len(first["candidates"]) == 3 and first["source"] == "file"
    assert next_task(queue, ANN) == first  # a reload: the same task, candidates and order
    shared = next_task(queue, BOB)
    assert shared is not None and shared["task_id"] == first["task_id"]  # its second labeler
    assert shared["prompt_id"] == first["prompt_id"]  # ranks the same candidates
    assert {c["completion_id"] for c in shared["candidates"]} == {
        c["completion_id"] for c in first["candidates"]
    }

    ids = [c["completion_id"] for c in first["candidates"]]
    ranking = {"ranking": [ids[2], [ids[0], ids[1]]], "idempotency_key": "ann-1"}
    assert call(queue, "/v1/feedback", {**ranking, "labeler": "bob"}, ANN)[0] == 403
    assert call(queue, "/v1/feedback", ranking, ANN)[0] == 201
    assert call(queue, "/v1/feedback", ranking, ANN)[0] == 200  # a double submit: one ranking
    following = next_task(queue, ANN)
    assert following is not None and following["prompt"] == "sort: cba"
    assert following["ranked_today"] == 1
    assert stored(queue, "SELECT state, labeler FROM task_claims WHERE task_id = "
                         f"'{first['task_id']}' ORDER BY labeler") == [
        ("ranked", "ann"), ("reserved", "bob")]  # fmt: skip

    # bob orders what ann tied, and puts last what she put first: 0 of 3 pairs alike
    assert get(queue, "/v1/stats/agreement", ADMIN)["pairs"] == 0
    assert call(queue, "/v1/feedback", {"ranking": [ids[0], ids[1], ids[2]]}, BOB)[0] == 201
    figures = get(queue, "/v1/stats/agreement", ADMIN)
    assert (figures["shared_comparisons"], figures["pairs"], figures["rate"]) == (1, 3, 0.0)
    assert [(x["labeler"], x["pairs"]) for x in figures["labelers"]] == [("ann", 3), ("bob", 3)]
    labelers = get(queue, "/v1/stats/labelers", ADMIN)["labelers"]
    assert [(x["labeler"], x["rankings"]) for x in labelers] == [("ann", 1), ("bob", 1)]

    status, skipped = call(queue, "/v1/tasks/skip", {"task_id": following["task_id"]}, ANN)
    assert status == 200 and skipped["state"] == "skipped"
    status, error = call(queue, "/v1/tasks/skip", {"task_id": following["task_id"]}, BOB)
    assert status == 404 and error["error"]["param"] == "task_id"


def test_a_typed_prompt_is_the_labelers_at_once_and_traffic_refills(
    queue: ServerProcess,
) -> None:
    status, typed = call(queue, "/v1/tasks/typed", {"prompt": "capitalise: hi"}, BOB)
    assert status == 200 and typed["task"]["source"] == "typed"
    assert typed["task"]["prompt"] == "capitalise: hi" and len(typed["task"]["candidates"]) == 3
    status, error = call(queue, "/v1/tasks/typed", {"prompt": "capitalise: hi"}, ANN)
    assert status == 400 and "already queued" in error["error"]["message"]

    while (task := next_task(queue, ANN)) is not None and task["source"] != "traffic":
        assert call(queue, "/v1/tasks/skip", {"task_id": task["task_id"]}, ANN)[0] == 200
    chat = {"messages": [{"role": "user", "content": "add: 2 + 2"}], "max_tokens": 4}
    assert call(queue, "/v1/chat/completions", chat, ADMIN)[0] == 200  # logged traffic
    task = next_task(queue, ANN)
    assert task is not None and task["source"] == "traffic" and "add: 2 + 2" in task["prompt"]


def test_prompts_add_queues_a_jsonl_file_through_grpc(queue: ServerProcess, tmp_path: Path) -> None:
    def flywheel(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLYWHEEL, "prompts", "add", *args, "--server", queue.grpc,
                               "--api-key", ADMIN, "--json"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    good = tmp_path / "prompts.jsonl"
    good.write_text('"capitalise: yes"\n\n{"prompt": "reverse: xyz", "id": 7}\n"capitalise: yes"\n')
    done = flywheel(str(good))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"added": 2, "duplicates": 1, "file": str(good)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"text": "no prompt field"}\n')
    done = flywheel(str(bad))
    assert done.returncode == 2 and f"{bad}:2: expected a JSON string" in done.stderr
    assert stored(queue, "SELECT count(*) FROM tasks WHERE text = 'fine'") == [(0,)]


def test_a_chat_ranking_leaves_with_its_messages_over_both_transports(
    queue: ServerProcess,
) -> None:
    from flywheel_client import FlywheelClient

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "sort: zyx"}]  # fmt: skip
    status, compared = call(queue, "/v1/compare", {"messages": messages, "k": 2, "max_tokens": 4},
                            ADMIN)  # fmt: skip
    assert status == 200
    ids = [c["completion_id"] for c in compared["candidates"]]
    assert call(queue, "/v1/feedback", {"ranking": ids}, ANN)[0] == 201

    request = urllib.request.Request(f"{queue.http}/v1/export?format=rankings&limit=1000",
                                     headers={"authorization": f"Bearer {ADMIN}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        lines = [json.loads(line) for line in r.read().decode().splitlines()]
        assert int(r.headers["flywheel-next"]) >= len(lines)
    [mine] = [x for x in lines if x.get("messages") == messages]
    assert mine["labeler"] == "ann" and len(mine["ranking"]) == 2
    assert "sort: zyx" in mine["prompt"]  # the text the policy saw, template applied
    with FlywheelClient(queue.grpc, api_key=ADMIN) as client:
        records = client.export_rankings(0, 1000)
    assert [list(r.messages) for r in records if r.ranking_id == mine["ranking_id"]] == [messages]
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(queue, "/v1/export?format=csv", ADMIN)
    assert refused.value.code == 400 and json.load(refused.value)["error"]["param"] == "format"
