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
