"""Prometheus metrics: every `flywheel_…` series is defined here, and only here.

BentoML renders /metrics from prometheus-client's multiprocess directory, which the client picks
at import time: `app.prepare_process` sets PROMETHEUS_MULTIPROC_DIR before this module is first
imported (in a plain interpreter, as in unit tests, the series live in memory instead). So every
gauge names a `multiprocess_mode`.

Transports time requests (`start_request` … `RequestClock.finish`), the service counts what it
stored, and the gauges that mirror state (queue, batch, live versions) are sampled when
/metrics is scraped (`RefreshOnScrape`), so the decode loop never touches a metric.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from flywheel_server.domain import (
    ChallengeStatus,
    CompletionRecord,
    DemonstrationReceipt,
    RankingReceipt,
)
from flywheel_server.registry import parse_id

# Generation is slow on CPU: buckets reach minutes, not the client's 10 s default.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SWAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "flywheel_requests_total",
    "Requests answered, by transport, route (HTTP path or gRPC method) and status "
    "(HTTP status code or gRPC code name).",
    ["transport", "route", "status"],
)
REQUEST_DURATION = Histogram(
    "flywheel_request_duration_seconds",
    "End-to-end request time, to the last byte of a streamed answer.",
    ["transport", "route"],
    buckets=REQUEST_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "flywheel_time_to_first_token_seconds",
    "Time from a generation request's arrival to its first token event.",
    ["transport"],
    buckets=REQUEST_BUCKETS,
)
GENERATED_TOKENS = Counter(
    "flywheel_generated_tokens_total",
    "Completion tokens generated and recorded, by policy version.",
    ["policy"],
)
QUEUE_DEPTH = Gauge(
    "flywheel_queue_depth",
    "Requests admitted by the engine and waiting to join the decode batch.",
    multiprocess_mode="livemostrecent",
)
RUNNING_ROWS = Gauge(
    "flywheel_running_rows",
    "Rows (completions) in the engine's decode batch.",
    multiprocess_mode="livemostrecent",
)
ENGINE_PEAK_MEMORY = Gauge(
    "flywheel_engine_peak_memory_bytes",
    "Peak memory of the serving process: CUDA max allocated on the engine's device, else peak "
    "RSS (a vLLM backend's own process is not counted).",
    multiprocess_mode="livemax",
)
LIVE_POLICY_VERSION = Gauge(
    "flywheel_live_policy_version",
    "Version number of the live policy (0: the bare base model).",
    multiprocess_mode="livemostrecent",
)
LIVE_REWARD_VERSION = Gauge(
    "flywheel_live_reward_version",
    "Version number of the live reward model (0: none live yet).",
    multiprocess_mode="livemostrecent",
)
HOT_SWAPS = Counter(
    "flywheel_hot_swaps_total",
    "Changes of the live adapter (publish with promote, promote, rollback), by adapter name.",
    ["name"],
)
HOT_SWAP_SECONDS = Histogram(
    "flywheel_hot_swap_seconds",
    "Time from the start of a publish (or promote, rollback) until the version is live.",
    buckets=SWAP_BUCKETS,
)
RANKINGS = Counter("flywheel_rankings_total", "Rankings stored (duplicates not counted).")
RANKING_PAIRS = Counter(
    "flywheel_ranking_pairs_total", "Preference pairs implied by the rankings stored."
)
DEMONSTRATIONS = Counter(
    "flywheel_demonstrations_total", "Demonstrations stored (duplicates not counted)."
)
DUPLICATE_SUBMISSIONS = Counter(
    "flywheel_duplicate_submissions_total",
    "Submissions answered from an earlier one with the same idempotency key, by kind.",
    ["kind"],
)
CHALLENGER_DECISIONS = Counter(
    "flywheel_challenger_decisions_total",
    "Challenges decided by the labelers' rankings, by outcome (promoted, retired).",
    ["outcome"],
)
CHALLENGER_VERSION = Gauge(
    "flywheel_challenger_version",
    "Version number of the running challenger policy (0: no challenge runs).",
    multiprocess_mode="livemostrecent",
)
CHALLENGER_RANKINGS = Gauge(
    "flywheel_challenger_rankings",
    "Rankings counted by the running challenge (as of the last one judged here).",
    multiprocess_mode="livemostrecent",
)
CHALLENGER_WIN_RATE = Gauge(
    "flywheel_challenger_win_rate",
    "The running challenger's win rate against the champion (ties half): its mean and the lower "
    "and upper bounds of its interval, as of the last ranking judged here.",
    ["estimate"],
    multiprocess_mode="livemostrecent",
)
STALLED_STREAMS = Counter(
    "flywheel_stalled_streams_total",
    "Responses cut off because the client read nothing for --write-timeout-s while they waited "
    "to be written (HTTP: the connection aborted; gRPC: the call ended DEADLINE_EXCEEDED).",
    ["transport"],
)
REJECTED = Counter(
    "flywheel_rejected_total",
    "Requests refused at a transport's error boundary, by error class.",
    ["reason"],
)
KEY_REJECTED = Counter(
    "flywheel_key_rejected_total",
    "Requests refused for their API key (unknown, scope, rate, labeler), by key name and class.",
    ["key", "reason"],
)


# -- requests ------------------------------------------------------------------------------------


class RequestClock:
    """One request's timings. `finish` counts it once; `first_token` observes TTFT once."""

    def __init__(self, transport: str, route: str) -> None:
        self.transport = transport
        self.route = route
        self.started = time.perf_counter()
        self._first_token = False
        self._finished = False

    def first_token(self) -> None:
        if not self._first_token:
            self._first_token = True
            TIME_TO_FIRST_TOKEN.labels(self.transport).observe(time.perf_counter() - self.started)

    def finish(self, status: int | str) -> None:
        if not self._finished:
            self._finished = True
            REQUESTS.labels(self.transport, self.route, str(status)).inc()
            REQUEST_DURATION.labels(self.transport, self.route).observe(
                time.perf_counter() - self.started
            )


# Each HTTP request and each RPC runs in its own task, so a context variable reaches the service
# code a request calls without threading a clock through every signature.
_current: ContextVar[RequestClock | None] = ContextVar("flywheel_request", default=None)


def start_request(transport: str, route: str) -> RequestClock:
    clock = RequestClock(transport, route)
    _current.set(clock)
    return clock


def first_token() -> None:
    """Called by the service at a generation's first token event; a no-op outside a request."""
    clock = _current.get()
    if clock is not None:
        clock.first_token()


async def finish_after(
    body: AsyncIterable[Any], clock: RequestClock, status: int | str
) -> AsyncIterator[Any]:
    """`body`, finishing `clock` when the last item is sent (or the client goes away)."""
    try:
        async for item in body:
            yield item
    finally:
        clock.finish(status)


def rejected(error: BaseException) -> None:
    REJECTED.labels(type(error).__name__).inc()
    key = getattr(error, "key", None)  # a refusal for an API key names it
    if isinstance(key, str):
        KEY_REJECTED.labels(key, type(error).__name__).inc()


# -- the service ---------------------------------------------------------------------------------


def generated(completions: Iterable[CompletionRecord]) -> None:
    for c in completions:
        GENERATED_TOKENS.labels(c.policy).inc(c.completion_tokens)


def ranked(receipt: RankingReceipt) -> None:
    if receipt.duplicate:
        DUPLICATE_SUBMISSIONS.labels("ranking").inc()
    else:
        RANKINGS.inc()
        RANKING_PAIRS.inc(receipt.pairs)


def demonstrated(receipt: DemonstrationReceipt) -> None:
    if receipt.duplicate:
        DUPLICATE_SUBMISSIONS.labels("demonstration").inc()
    else:
        DEMONSTRATIONS.inc()


def challenge_decided(outcome: str) -> None:
    CHALLENGER_DECISIONS.labels(outcome).inc()


def hot_swapped(name: str, started: float) -> None:
    """`started` is the `time.perf_counter()` at which the publish (or promote) began."""
    HOT_SWAPS.labels(name).inc()
    HOT_SWAP_SECONDS.observe(time.perf_counter() - started)


# -- sampled at scrape time ----------------------------------------------------------------------


def sample(
    load: dict[str, int],
    live: dict[str, str],
    challenge: ChallengeStatus | None = None,
    peak_memory: int = 0,
) -> None:
    """Set the state gauges from `engine.load`, `registry.live()`, the latest challenge tally
    and the process's peak memory (`flywheel_model.memory`)."""
    ENGINE_PEAK_MEMORY.set(peak_memory)
    QUEUE_DEPTH.set(load["waiting"])
    RUNNING_ROWS.set(load["rows"])
    versions = {name: parse_id(i, field="live")[1] or 0 for name, i in live.items()}
    LIVE_POLICY_VERSION.set(versions.get("policy", 0))
    LIVE_REWARD_VERSION.set(versions.get("reward", 0))
    running = challenge if challenge and challenge.challenge.outcome == "running" else None
    CHALLENGER_VERSION.set(running.challenge.challenger if running else 0)
    CHALLENGER_RANKINGS.set(running.tally.rankings if running else 0)
    tally = running.tally if running else None
    estimates = (
        {"mean": tally.win_rate, "lower": tally.lower, "upper": tally.upper} if tally else {}
    )
    for estimate in ("mean", "lower", "upper"):
        CHALLENGER_WIN_RATE.labels(estimate).set(estimates.get(estimate, 0.0))


class RefreshOnScrape:
    """ASGI middleware: runs `refresh` just before the app answers GET /metrics."""

    def __init__(self, app: Any, refresh: Callable[[], None]) -> None:
        self.app = app
        self.refresh = refresh

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            self.refresh()
        await self.app(scope, receive, send)
