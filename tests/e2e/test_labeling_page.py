"""The labeling page in real Chromium (Debian's, driven by Playwright), every request to an
address that is not loopback blocked: a labeler ranks three tasks by keyboard and one by
dragging, with a tie, a skip and a written better answer; the store holds exactly those
rankings, tiers and labeler; a retried submit stores one ranking; a second labeler's other
order on a shared task moves the agreement figure.

Screenshots go to $FLYWHEEL_SCREENSHOTS (docs/screenshots for the README) or a temporary
folder."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness import ServerProcess
from flywheel_cli.labelers import Labeler, demo_prompts, preference_from_spec
from flywheel_client import FlywheelClient
from tests.e2e.test_learn_loop import one_round, tiny_config
from tests.support import LABELING_KEYS, labeling_server

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMIN, ANN, BOB = (LABELING_KEYS[name] for name in ("ops", "ann", "bob"))
PROMPTS = ["reverse: abc", "sort: cba", "capitalise: hi", "add: 1 + 2", "reverse: xyz"]
GUIDELINES = (
    "# How to rank\n\n- The **correct** answer first.\n- Tie answers that are equally good.\n"
)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("ui")
    guidelines = data / "guidelines.md"
    guidelines.write_text(GUIDELINES)
    proc = labeling_server(tiny_model, data, "--guidelines", str(guidelines),
                           "--task-shared-share", "1", "--task-candidates", "3")  # fmt: skip
    status, body = proc.post(
        "/v1/tasks", {"prompts": PROMPTS}, {"authorization": f"Bearer {ADMIN}"}
    )
    assert (status, body["added"]) == (201, len(PROMPTS))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make install` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


def open_page(
    browser: Any, server: ServerProcess, key: str, path: str = "", ready: str = "#candidates li"
) -> tuple[Any, list[str]]:
    """A signed-in page (the labeling page, or `path`); every request to a non-loopback host
    is aborted and noted."""
    page = browser.new_context(viewport={"width": 1366, "height": 768}).new_page()
    blocked: list[str] = []

    def guard(route: Any) -> None:
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost", "::1"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    page.goto(f"{server.http}/ui/{path}")
    page.fill("#credential", key)
    page.keyboard.press("Enter")
    page.wait_for_selector(ready)
    return page, blocked


def shown(page: Any) -> tuple[str, list[str]]:
    """The task on the page: its prompt and its candidates' completion ids in display order."""
    task = page.evaluate("state.task")
    return task["prompt"], [c["completion_id"] for c in task["candidates"]]


def next_task(page: Any, after: str) -> None:
    page.wait_for_function("(after) => state.task && state.task.prompt !== after", arg=after)


def rankings(server: ServerProcess) -> dict[tuple[str, str], list[list[str]]]:
    """(labeler, prompt text of the task) -> tiers of completion ids, from the store."""
    with sqlite3.connect(server.data_dir / "flywheel.db") as db:
        rows = db.execute(
            "SELECT r.labeler, t.text, i.tier, i.completion_id FROM rankings r "
            "JOIN task_claims c ON c.prompt_id = r.prompt_id AND c.labeler = r.labeler "
            "JOIN tasks t ON t.id = c.task_id JOIN ranking_items i ON i.ranking_id = r.id "
            "ORDER BY r.seq, i.tier, i.completion_id"
        ).fetchall()
    out: dict[tuple[str, str], list[list[str]]] = {}
    for labeler, text, tier, cid in rows:
        tiers = out.setdefault((labeler, text), [])
        while len(tiers) <= tier:
            tiers.append([])
        tiers[tier].append(cid)
    return out


def get(server: ServerProcess, path: str) -> Any:
    request = urllib.request.Request(server.http + path,
                                     headers={"authorization": f"Bearer {ADMIN}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def screenshots() -> Path:
    folder = Path(os.environ.get("FLYWHEEL_SCREENSHOTS") or "/tmp/flywheel-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_labeler_ranks_by_keyboard_and_by_dragging(browser: Any, server: ServerProcess) -> None:
    page, blocked = open_page(browser, server, ANN)
    assert "The correct answer first" in page.inner_text("#guidelines")
    want: dict[str, list[list[str]]] = {}

    # 1: keyboard, with a tie: #2 = #1, then #3
    prompt, ids = shown(page)
    page.screenshot(path=str(screenshots() / "labeling.png"))
    for key in ("2", "=", "1", "3"):
        page.keyboard.press(key)
    assert page.inner_text("#ranking") == "#2 = #1\n#3"
    page.keyboard.press("Enter")
    want[prompt] = [sorted([ids[1], ids[0]]), [ids[2]]]
    next_task(page, prompt)

    # 2: skipped
    prompt, _ = shown(page)
    page.keyboard.press("s")
    next_task(page, prompt)

    # 3: keyboard, with a better answer written
    prompt, ids = shown(page)
    for key in ("3", "1", "2"):
        page.keyboard.press(key)
    page.fill("#better", "cba, reversed by hand")
    page.click("#submit")
    want[prompt] = [[ids[2]], [ids[0]], [ids[1]]]
    demonstrated = prompt
    next_task(page, prompt)

    # 4: dragged: #2 first, then #1 tied with it by a drop on its tier, #3 left last
    prompt, ids = shown(page)
    page.drag_and_drop("#candidates li[data-index='1']", "#ranking")
    page.drag_and_drop("#candidates li[data-index='0']", "#ranking li.tier")
    assert page.inner_text("#ranking") == "#2 = #1"
    page.keyboard.press("Enter")
    want[prompt] = [sorted([ids[1], ids[0]]), [ids[2]]]
    next_task(page, prompt)

    # 5: keyboard, and the submit reaches the server twice (a retried request)
    prompt, ids = shown(page)
    replays: list[int] = []

    def twice(route: Any) -> None:
        first = route.fetch()
        replays.append(route.fetch().status)  # the same body, idempotency key included
        route.fulfill(response=first)

    page.route("**/v1/feedback", twice)
    for key in ("1", "2", "3"):
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    want[prompt] = [[ids[0]], [ids[1]], [ids[2]]]
    page.wait_for_function("(after) => !state.task || state.task.prompt !== after", arg=prompt)
    assert replays == [200]  # the replay was recognised: nothing new stored

    stored = rankings(server)
    assert {text: tiers for (labeler, text), tiers in stored.items() if labeler == "ann"} == {
        p: [sorted(t) for t in tiers] for p, tiers in want.items()
    }
    assert {labeler for labeler, _ in stored} == {"ann"}
    with sqlite3.connect(server.data_dir / "flywheel.db") as db:
        demos = db.execute("SELECT prompt, response, labeler FROM demonstrations").fetchall()
    assert len(demos) == 1 and demos[0][1:] == ("cba, reversed by hand", "ann")
    assert demonstrated in demos[0][0]
    assert blocked == []


def test_a_second_labelers_other_order_moves_the_agreement(
    browser: Any, server: ServerProcess
) -> None:
    before = get(server, "/v1/stats/agreement")
    page, blocked = open_page(browser, server, BOB)
    prompt, ids = shown(page)
    assert prompt == PROMPTS[0]  # ann's first task, shared: the same candidates for bob
    ann = rankings(server)[("ann", prompt)]
    assert sorted(ids) == sorted(cid for tier in ann for cid in tier)
    # bob puts last what ann put first, and orders what she tied
    order = [*sorted(ann[0]), *ann[1]][::-1]
    for cid in order:
        page.keyboard.press(str(ids.index(cid) + 1))
    page.keyboard.press("Enter")
    next_task(page, prompt)
    page.screenshot(path=str(screenshots() / "labeling-next.png"))
    after = get(server, "/v1/stats/agreement")
    assert before["pairs"] == 0 and after["shared_comparisons"] == 1
    assert after["pairs"] == 3 and after["rate"] == 0.0
    assert blocked == []


def test_an_admin_sees_a_new_version_after_a_learner_round_and_rolls_it_back(
    browser: Any, server: ServerProcess, tiny_model: Path, tmp_path: Path
) -> None:
    page, blocked = open_page(browser, server, ADMIN, "admin", "#board")
    page.wait_for_function("document.getElementById('live').textContent.startsWith('live:')")
    assert page.locator("#versions tbody tr").count() == 0  # no version but the base yet
    with FlywheelClient(server.grpc, api_key=ADMIN, timeout=60) as client:
        labeler = Labeler(client, preference_from_spec("longer"), name="ops", k=3, max_tokens=6)
        assert labeler.run(demo_prompts(seed=3), count=32).submitted >= 16
    config = dataclasses.replace(tiny_config(server, tiny_model, tmp_path / "learner"),
                                 api_key=ADMIN)  # fmt: skip
    assert one_round(config) is True  # refit, PPO-ptx, the open gate, published live

    page.reload()  # the page also refreshes itself every 15 s
    live = page.locator("#versions tbody tr.live")
    live.wait_for()
    version = live.get_attribute("data-version")
    assert version is not None and version.startswith("policy-v")
    assert f"live: {version}" in page.inner_text("#live")
    # the round's reward model, now live, scores the labelers' rankings
    ops = page.locator("#agreement-table tbody tr", has_text="ops")
    ops.wait_for()
    assert "% of" in ops.locator("td").nth(2).inner_text()
    page.screenshot(path=str(screenshots() / "dashboard.png"), full_page=True)

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#rollback")
    page.wait_for_function(
        "(v) => !document.querySelector(`#versions tr.live[data-version='${v}']`)", arg=version
    )
    policies = get(server, "/v1/policies")
    assert policies["live"]["policy"] == "policy-v0"
    assert f"live: {policies['live']['policy']}" in page.inner_text("#live")
    assert blocked == []
