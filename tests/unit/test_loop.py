"""The learner's pure parts and its crash safety, against fake clients (no server, no model)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest

from flywheel_client import types as t
from flywheel_learner import feedback_log
from flywheel_learner.checkpoint import (
    STATE_FILE,
    LearnerState,
    PendingPublish,
    atomic_write_text,
    load_state,
    save_state,
)
from flywheel_learner.config import LEARNER_PPO, LearnerConfig
from flywheel_learner.gate import EvalMetrics, GateThresholds, gate
from flywheel_learner.loop import held_out, should_wake
from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.progress import kv
from flywheel_learner.publishing import archive_sha256, publish, recover

pytestmark = pytest.mark.unit

# -- the gate ------------------------------------------------------------------------------------

THRESHOLDS = GateThresholds(min_reward_gain=0.1, max_kl=5.0, max_ptx_rise=0.2)


def metrics(
    gain: float = 0.5, kl: float = 1.0, rise: float = 0.0, greedy: float = 0.5
) -> EvalMetrics:
    return EvalMetrics(1.0 + gain, 1.0, 1.0 + greedy, 1.0, kl, 2.0 + rise, 2.0, 0.1)


def test_gate_passes_a_safe_improvement() -> None:
    assert gate(metrics(), THRESHOLDS) == (True, [])


@pytest.mark.parametrize(
    ("m", "word"),
    [
        (metrics(gain=0.05), "reward gain"),
        (metrics(kl=5.5), "KL"),
        (metrics(rise=0.3), "pretraining loss"),
        (metrics(gain=math.nan), "reward gain"),
        (metrics(greedy=-0.01), "greedy answers"),
        (metrics(greedy=math.nan), "greedy answers"),
        (metrics(kl=math.nan), "KL"),
    ],
)
def test_gate_names_each_failed_check(m: EvalMetrics, word: str) -> None:
    passed, reasons = gate(m, THRESHOLDS)
    assert not passed and len(reasons) == 1 and word in reasons[0]


def test_gate_lists_every_failure_and_bounds_are_inclusive() -> None:
    passed, reasons = gate(metrics(gain=-1.0, kl=9.0, rise=1.0, greedy=-1.0), THRESHOLDS)
    assert not passed and len(reasons) == 4
    at_bounds = EvalMetrics(1.5, 1.0, 1.25, 1.0, 5.0, 2.5, 2.0, 0.0)
    assert gate(at_bounds, GateThresholds(0.5, 0.25, 5.0, 0.5))[0]


def test_gate_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="max_kl must be >= 0"):
        GateThresholds(max_kl=-1.0)


def test_the_learner_aims_its_kl_below_the_gates_bound(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    config = LearnerConfig(server="127.0.0.1:1", model_dir=tmp_path, work_dir=tmp_path / "w")
    assert config.ppo.adaptive_kl and config.ppo.kl_target < config.gate.max_kl
    with pytest.raises(ValueError, match=r"kl_target .* must be below the gate's max_kl"):
        LearnerConfig(
            server="127.0.0.1:1",
            model_dir=tmp_path,
            work_dir=tmp_path / "w",
            ppo=LEARNER_PPO,
            gate=GateThresholds(max_kl=LEARNER_PPO.kl_target),
            kl_stop=1.0,
        )
    with pytest.raises(ValueError, match=r"kl_stop .* at most the gate's max_kl"):
        LearnerConfig(
            server="127.0.0.1:1", model_dir=tmp_path, work_dir=tmp_path / "w", kl_stop=21.0
        )


def test_an_adaptive_kl_controller_resumes_from_a_saved_beta() -> None:
    adaptive = PPOConfig(beta=0.1, adaptive_kl=True)
    assert adaptive.kl_controller().beta == 0.1
    assert adaptive.kl_controller(0.37).beta == 0.37
    assert PPOConfig(beta=0.1).kl_controller(0.37).beta == 0.1  # a fixed beta stays fixed


def test_metrics_dict_has_derived_values() -> None:
    d = metrics(gain=0.5, rise=0.25).as_dict()
    assert d["reward_gain"] == pytest.approx(0.5) and d["ptx_rise"] == pytest.approx(0.25)
    assert d["greedy_reward_gain"] == pytest.approx(0.5)


def test_should_wake() -> None:
    assert should_wake(16, 16, 0.0, 120.0)
    assert not should_wake(15, 16, 10.0, 120.0)
    assert should_wake(1, 16, 120.0, 120.0)
    assert not should_wake(0, 16, 1e9, 120.0)


def test_held_out_is_stable_and_a_minority() -> None:
    ids = [f"p{i}" for i in range(1000)]
    share = sum(held_out(i) for i in ids) / len(ids)
    assert 0.15 < share < 0.25
    assert [held_out(i) for i in ids] == [held_out(i) for i in ids]


def test_kv_line() -> None:
    assert kv("x", a=1, b=0.123456, c="two words") == "event=x a=1 b=0.1235 c='two words'"


# -- state ---------------------------------------------------------------------------------------


def test_state_round_trip(tmp_path: Path) -> None:
    assert load_state(tmp_path) == LearnerState()
    pending = PendingPublish("policy", "/x", "ab" * 32, {"reward_gain": 0.5}, True)
    state = LearnerState(rankings_cursor=7, prompts_cursor=9, round=3, pending=pending)
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state


def test_state_errors_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        load_state(tmp_path)
    (tmp_path / STATE_FILE).write_text('{"bogus": 1}')
    with pytest.raises(ValueError, match="unknown keys"):
        load_state(tmp_path)


def test_atomic_write_leaves_the_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left behind


# -- sync against a fake server ------------------------------------------------------------------


def ranking(cursor: int) -> t.RankingRecord:
    completions = (
        t.RankedCompletion(f"c{cursor}a", "long answer", "policy-v0", 0),
        t.RankedCompletion(f"c{cursor}b", "short", "policy-v0", 1),
        t.RankedCompletion(f"c{cursor}c", "tied", "policy-v0", 1),
    )
    return t.RankingRecord(cursor, f"r{cursor}", f"p{cursor}", f"prompt {cursor}", completions,
                           "sim", 0.0)  # fmt: skip


class FakeExport:
    def __init__(self, n: int) -> None:
        self.rankings = [ranking(c) for c in range(1, n + 1)]
        self.prompts = [t.PromptRecord(c, f"p{c}", f"prompt {c}", 0.0) for c in range(1, n + 1)]
        self.calls: list[tuple[str, int, int]] = []

    def export_rankings(self, after: int = 0, limit: int = 0) -> list[t.RankingRecord]:
        self.calls.append(("rankings", after, limit))
        return [r for r in self.rankings if r.cursor > after][: limit or None]

    def export_prompts(self, after: int = 0, limit: int = 0) -> list[t.PromptRecord]:
        self.calls.append(("prompts", after, limit))
        return [p for p in self.prompts if p.cursor > after][: limit or None]


def test_sync_pages_through_and_advances_cursors(tmp_path: Path) -> None:
    fake = FakeExport(7)
    result = feedback_log.sync(fake, tmp_path, LearnerState(), page=3)
    assert (result.new_rankings, result.new_prompts) == (7, 7)
    assert result.state.rankings_cursor == 7 and result.state.prompts_cursor == 7
    assert load_state(tmp_path) == result.state
    assert [c[1] for c in fake.calls if c[0] == "rankings"] == [0, 3, 6]
    logged = feedback_log.read_rankings(tmp_path)
    assert [r.ranking_id for r in logged] == [f"r{i}" for i in range(1, 8)]
    assert logged[0].tiers == (("long answer",), ("short", "tied"))
    assert feedback_log.read_prompts(tmp_path)[0] == ("p1", "prompt 1")
    # Nothing new: nothing written, the cursor stays.
    again = feedback_log.sync(fake, tmp_path, result.state, page=3)
    assert (again.new_rankings, again.state) == (0, result.state)


def test_crash_between_data_and_cursor_does_not_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeExport(5)
    calls = 0
    real_save = feedback_log.save_state

    def crash_on_second_save(work_dir: Path, state: LearnerState) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second page's data is written, its cursor is not
            raise KeyboardInterrupt
        real_save(work_dir, state)

    monkeypatch.setattr(feedback_log, "save_state", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        feedback_log.sync(fake, tmp_path, LearnerState(), page=2)
    monkeypatch.setattr(feedback_log, "save_state", real_save)

    state = load_state(tmp_path)
    assert state.rankings_cursor == 2  # the first page only
    assert len(feedback_log.read_rankings(tmp_path)) == 4
    result = feedback_log.sync(fake, tmp_path, state, page=2)
    assert result.new_rankings == 1  # r3 and r4 were already held
    rows = [
        json.loads(line)
        for f in sorted((tmp_path / "rankings").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    ids = [row["ranking_id"] for row in rows]
    assert sorted(ids) == [f"r{i}" for i in range(1, 6)]  # each stored exactly once
    assert result.state.rankings_cursor == 5


def test_uninformative_rankings_are_flagged(tmp_path: Path) -> None:
    assert not feedback_log.Ranking("r", "p", (("a", "b"),)).informative
    assert feedback_log.Ranking("r", "p", (("a",), ("b",))).informative


# -- pending-publish recovery --------------------------------------------------------------------


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, bool]] = []
        self.server: list[t.AdapterVersion] = []

    def versions(self, name: str = "") -> t.Versions:
        return t.Versions(tuple(v for v in self.server if not name or v.name == name), {})

    def publish_adapter(
        self,
        directory: str | Path,
        *,
        name: str,
        base_model: str,
        metrics: Mapping[str, float] | None = None,
        promote: bool = False,
        challenger: bool = False,
        chunk_size: int = 1 << 20,
    ) -> t.AdapterVersion:
        sha = archive_sha256(directory)
        self.published.append((name, sha, promote))
        n = len([v for v in self.server if v.name == name]) + 1
        version = t.AdapterVersion(f"{name}-v{n}", name, n, "live" if promote else "ready", sha,
                                   0.0, dict(metrics or {}), base_model)  # fmt: skip
        self.server.append(version)
        return version


def adapter_dir(tmp_path: Path, content: str = "weights") -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_text(content)
    return d


def test_publish_checkpoints_then_clears(tmp_path: Path) -> None:
    fake = FakePublisher()
    d = adapter_dir(tmp_path)
    pending = PendingPublish("policy", str(d), archive_sha256(d), {"reward_gain": 1.0}, True)
    state, version = publish(fake, tmp_path, LearnerState(), pending, "base")
    assert version is not None and version.state == "live"
    assert state.pending is None and load_state(tmp_path).pending is None
    assert fake.published == [("policy", pending.sha256, True)]


def test_recovery_does_not_republish_what_landed(tmp_path: Path) -> None:
    fake = FakePublisher()
    d = adapter_dir(tmp_path)
    pending = PendingPublish("policy", str(d), archive_sha256(d), {}, True)
    fake.publish_adapter(d, name="policy", base_model="base", promote=True)  # landed, then kill
    save_state(tmp_path, LearnerState(pending=pending))
    state, version = recover(fake, tmp_path, load_state(tmp_path), "base")
    assert version is not None and version.id == "policy-v1"
    assert len(fake.published) == 1 and state.pending is None
    assert load_state(tmp_path).pending is None


def test_recovery_publishes_what_did_not_land(tmp_path: Path) -> None:
    fake = FakePublisher()
    d = adapter_dir(tmp_path)
    pending = PendingPublish("reward", str(d), archive_sha256(d), {"train_loss": 0.3}, False)
    save_state(tmp_path, LearnerState(round=2, pending=pending))
    state, version = recover(fake, tmp_path, load_state(tmp_path), "base")
    assert fake.published == [("reward", pending.sha256, False)]
    assert version is not None and version.metrics == {"train_loss": 0.3}
    assert state.pending is None and state.round == 2


def test_recovery_without_pending_does_nothing(tmp_path: Path) -> None:
    fake = FakePublisher()
    state, version = recover(fake, tmp_path, LearnerState(), "base")
    assert version is None and fake.published == [] and state == LearnerState()


# -- the command line ----------------------------------------------------------------------------


def test_learn_cli_rejects_a_missing_model_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flywheel_cli.main import main

    assert main(["learn", "--model", str(tmp_path / "nope"), "--server", "127.0.0.1:1"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err


def test_learn_cli_aims_at_half_the_kl_bound_and_refuses_a_target_beyond_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from flywheel_cli.main import main
    from flywheel_learner import loop

    (tmp_path / "config.json").write_text("{}")
    argv = ["learn", "--model", str(tmp_path), "--server", "127.0.0.1:1", "--max-kl", "8"]
    assert main([*argv, "--kl-target", "9"]) == 2
    assert "must be below the gate's max_kl (8.0)" in capsys.readouterr().err
    seen: list[LearnerConfig] = []
    monkeypatch.setattr(loop, "run", lambda config: seen.append(config) or 0)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    assert main(argv) == 0
    assert seen[0].ppo.kl_target == 4.0 and seen[0].stop_kl == pytest.approx(6.4)


def test_learn_cli_help_explains_the_loop(capsys: pytest.CaptureFixture[str]) -> None:
    from flywheel_cli.main import main

    with pytest.raises(SystemExit):
        main(["learn", "--help"])
    out = capsys.readouterr().out
    assert "--min-new-rankings" in out and "--import-preferences" in out and "gate" in out
    assert "--threads" in out
