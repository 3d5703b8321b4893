"""TensorBoard event files of the training curves: every step row and stage summary, readable back."""

import struct

import pytest

from readme_jax.train.tracking import EventLog

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TFRecord event files of a folder."""
    out: dict = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_stage_rows_and_summary_are_written(tmp_path):
    log = EventLog(tmp_path / "tb")
    rows = [{"round": 0, "stage": "router", "micro_step": i, "global_step": i, "loss": 1.0 / (i + 1),
             "agreement": 0.5} for i in range(3)]
    log.stage(0, "round0-router", rows, {"val_ppl": {"code": 12.5}, "locality_mean": 0.9,
                                         "router_accuracy": {"code": 0.75}})
    log.stage(1, "round0-experts", [{"round": 0, "stage": "experts", "step": 0, "micro": 0, "global_step": 0,
                                     "loss": 2.0}], {"val_ppl": {"code": 10.0}})
    log.close()
    got = read_scalars(tmp_path / "tb")
    assert got["router/loss"] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert got["router/agreement"] == [(0, 0.5)] * 1 + [(1, 0.5), (2, 0.5)]
    assert got["experts/loss"] == [(0, 2.0)]
    assert got["val/val_ppl/code"] == [(1, 12.5), (2, 10.0)]
    assert got["val/locality_mean"] == [(1, pytest.approx(0.9))]
    assert got["val/router_accuracy/code"] == [(1, 0.75)]
    assert "router/micro_step" not in got and "router/global_step" not in got


class _FakeRun:
    def __init__(self, **kw):
        self.init, self.logged, self.metrics, self.finished = kw, [], {}, False

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, d):
        self.logged.append(dict(d))

    def finish(self):
        self.finished = True


def _fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module recording what the tracker sends (wandb itself is not a dependency)."""
    import importlib.machinery
    import sys
    import types
    runs = []
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.util = types.SimpleNamespace(generate_id=lambda: f"id{len(runs)}")
    mod.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: mod.__spec__ if name == "wandb" else None)
    return runs


def test_wandb_gets_the_same_scalars_on_their_own_axes(tmp_path, monkeypatch):
    from readme_jax.train.tracking import Trackers, stage_scalars
    runs = _fake_wandb(monkeypatch)
    rows = [{"stage": "router", "global_step": i, "loss": 1.0 / (i + 1), "lr": 0.1} for i in range(3)]
    summary = {"val_ppl": {"code": 12.5}, "locality_mean": 0.9}
    t = Trackers(tmp_path / "train", "proj", config={"train": {"rounds": 2}})
    t.stage(0, "round0-router", rows, summary)
    t.stage(1, "round0-experts", [{"stage": "experts", "global_step": 0, "loss": 2.0}], {"val_ppl": {"code": 10.0}})
    t.close()
    (run,) = runs
    assert run.init["project"] == "proj" and run.init["id"] == "id0" and run.finished
    assert run.metrics["router/*"] == "router/global_step" and run.metrics["val/*"] == "val/stage"
    # every scalar of stage_scalars reaches wandb exactly once, with its x on its axis
    sent = {(k, e.get("val/stage", e.get("router/global_step", e.get("experts/global_step"))), v)
            for e in run.logged for k, v in e.items() if not k.endswith(("global_step", "/stage"))}
    want = {(tag, x, v) for s, r, m in [(0, rows, summary), (1, [{"stage": "experts", "global_step": 0, "loss": 2.0}],
                                                            {"val_ppl": {"code": 10.0}})]
            for tag, v, x in stage_scalars(s, r, m)}
    assert sent == want and len(sent) == 3 * 2 + 2 + 1 + 1
    assert run.logged[0] == {"router/global_step": 0, "router/loss": 1.0, "router/lr": 0.1}
    # a resumed folder continues the same W&B run
    Trackers(tmp_path / "train", "proj").stage(2, "round1-router", rows[:1], {})
    assert runs[1].init["id"] == "id0" and runs[1].init["resume"] == "allow"


def test_wandb_asked_for_but_missing_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    import readme_jax.train.tracking as tracking
    from readme_jax import cli
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None)
    rc = cli.main(["run", "--config", "tiny_test", "--no-progress", f"output_dir={tmp_path / 'run'}",
                   "train.wandb_project=p"])
    assert rc == 2 and "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written
