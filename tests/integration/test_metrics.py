"""Prometheus metrics on BentoML's /metrics: every flywheel_* series moves with the traffic
that should move it, and `promtool check metrics` accepts the page."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ServerProcess, make_adapter

pytestmark = pytest.mark.integration

# The classic text exposition format, which promtool and older Prometheus servers read.
TEXT_FORMAT = "text/plain; version=0.0.4"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerProcess) -> str:
    r = httpx.get(f"{server.http}/metrics", headers={"accept": TEXT_FORMAT}, timeout=30)
    r.raise_for_status()
    return r.text


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def live_versions(server: ServerProcess) -> dict[str, int]:
    live = httpx.get(f"{server.http}/v1/policies", timeout=30).json()["live"]
    return {name: int(i.rsplit("-v", 1)[1]) for name, i in live.items()}


def test_traffic_moves_every_series(server, grpc_client, tiny_model, tmp_path):
    from flywheel_model import loading

    before = parse(scrape(server))
    # Series that exist from start-up (the fixture published and promoted a reward model).
    for name in ("flywheel_queue_depth", "flywheel_running_rows", "flywheel_rankings_total"):
        assert (name, frozenset()) in before, name
    assert value(before, "flywheel_hot_swaps_total", name="reward") >= 1
    assert value(before, "flywheel_engine_peak_memory_bytes") > 50 << 20  # a process with torch

    status, done = server.post(
        "/v1/completions", {"prompt": "reverse: abc", "n": 2, "max_tokens": 4}
    )
    assert status == 200, done
    ids = [c["completion_id"] for c in done["choices"]]
    tokens = done["usage"]["completion_tokens"]
    policy = done["model"]

    body = {
        "prompt": "sort: cba",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.http}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    tokens += json.loads(events[-2])["usage"]["completion_tokens"]

    status, _ = server.post("/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert status == 400

    key = uuid.uuid4().hex
    ranking = {"ranking": ids, "labeler": "metrics-test", "idempotency_key": key}
    assert server.post("/v1/feedback", ranking)[0] == 201
    assert server.post("/v1/feedback", ranking)[0] == 200  # the same key again: a duplicate
    demo = {"prompt": "p", "response": "r", "labeler": "metrics-test", "idempotency_key": key}
    assert server.post("/v1/demonstrations", demo)[0] == 201
    assert server.post("/v1/demonstrations", demo)[0] == 200

    generation = grpc_client.generate("reverse: xyz", n=1, max_tokens=4)
    tokens += sum(c.completion_tokens for c in generation.completions)

    after = parse(scrape(server))

    def moved(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    http, grpc = {"transport": "http"}, {"transport": "grpc"}
    completions = {**http, "route": "/v1/completions"}
    assert moved("flywheel_requests_total", **completions, status="200") == 2
    assert moved("flywheel_requests_total", **completions, status="400") == 1
    assert moved("flywheel_requests_total", **http, route="/v1/feedback", status="201") == 1
    assert moved("flywheel_requests_total", **http, route="/v1/feedback", status="200") == 1
    assert moved("flywheel_requests_total", **grpc, route="Generate", status="OK") == 1
    assert moved("flywheel_request_duration_seconds_count", **completions) == 3
    assert moved("flywheel_request_duration_seconds_sum", **completions) > 0
    assert moved("flywheel_request_duration_seconds_count", **grpc, route="Generate") == 1
    # The rejected request produced no token; the three others each had a first one.
    assert moved("flywheel_time_to_first_token_seconds_count", **http) == 2
    assert moved("flywheel_time_to_first_token_seconds_count", **grpc) == 1
    assert moved("flywheel_time_to_first_token_seconds_sum", **http) > 0
    assert moved("flywheel_generated_tokens_total", policy=policy) == tokens > 0
    assert moved("flywheel_rankings_total") == 1
    assert moved("flywheel_ranking_pairs_total") == 1
    assert moved("flywheel_demonstrations_total") == 1
    assert moved("flywheel_duplicate_submissions_total", kind="ranking") == 1
    assert moved("flywheel_duplicate_submissions_total", kind="demonstration") == 1
    assert moved("flywheel_rejected_total", reason="InvalidRequest") == 1

    # A hot swap there and back: publish a new reward version live, then roll back.
    live = live_versions(server)
    assert value(after, "flywheel_live_policy_version") == live["policy"]
    assert value(after, "flywheel_live_reward_version") == live["reward"]
    published = grpc_client.publish_adapter(
        make_adapter(tiny_model, tmp_path / "reward", reward=True, seed=7),
        name="reward",
        base_model=loading.base_fingerprint(tiny_model),
        promote=True,
    )
    swapped = parse(scrape(server))
    assert value(swapped, "flywheel_live_reward_version") == published.version > live["reward"]
    grpc_client.rollback("reward")
    back = parse(scrape(server))
    assert value(back, "flywheel_live_reward_version") == live["reward"]
    assert (
        value(back, "flywheel_hot_swaps_total", name="reward")
        - value(after, "flywheel_hot_swaps_total", name="reward")
        == 2
    )
    assert (
        value(back, "flywheel_hot_swap_seconds_count")
        - value(after, "flywheel_hot_swap_seconds_count")
        == 2
    )


def test_load_gauges_follow_the_engine(server):
    """More rows than one decode batch holds: the scrape sees rows running and requests waiting.

    A fast machine can finish a burst between two scrapes, so bursts repeat (at most five) until
    both gauges have been seen up; then, idle, both read zero."""
    requests, n = 5, 16  # 80 rows; the default --max-batch is 64, so one request waits
    body = {"prompt": "reverse: abc", "n": n, "max_tokens": 48, "temperature": 1.0}
    peak = {"flywheel_running_rows": 0.0, "flywheel_queue_depth": 0.0}
    statuses: list[int] = []

    def generate() -> None:
        statuses.append(server.post("/v1/completions", body)[0])

    for burst in range(1, 6):
        threads = [threading.Thread(target=generate) for _ in range(requests)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples = parse(scrape(server))
            for name in peak:
                peak[name] = max(peak[name], value(samples, name))
        for t in threads:
            t.join()
        assert statuses == [200] * requests * burst
        if peak["flywheel_running_rows"] > 0 and peak["flywheel_queue_depth"] >= 1:
            break
    assert 0 < peak["flywheel_running_rows"] <= 64
    assert peak["flywheel_queue_depth"] >= 1
    idle = parse(scrape(server))
    assert value(idle, "flywheel_running_rows") == value(idle, "flywheel_queue_depth") == 0


def promtool() -> str | None:
    """$PROMTOOL, promtool on PATH, or the one scripts/get_promtool.sh put beside this Python."""
    beside = Path(sys.executable).parent / "promtool"
    return (
        os.environ.get("PROMTOOL")
        or shutil.which("promtool")
        or (str(beside) if beside.exists() else None)
    )


def test_promtool_accepts_the_page(server):
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not found: run scripts/get_promtool.sh or set PROMTOOL")
    # Traffic first, so labelled series and histograms are on the page.
    assert server.post("/v1/completions", {"prompt": "abc", "max_tokens": 2})[0] == 200
    assert server.post("/v1/completions", {"prompt": "abc", "max_tokens": 0})[0] == 400
    page = scrape(server)
    assert "flywheel_request_duration_seconds_bucket" in page
    checked = subprocess.run(
        [tool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
