"""MetricsWriter: metrics.jsonl and TensorBoard events, read back with TensorBoard's own reader."""
import json

import numpy as np
import pytest

from megallava.training.metrics import MetricsWriter, format_progress

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

RECORDS = [
    {"iteration": 1, "loss": 6.25, "lr": 1e-4, "grad_norm": 3.5, "trained_tokens": 100, "step_time_s": 0.5,
     "tokens_per_s": 4096.0, "tflops_per_gpu": 1.5, "mfu": None, "mem_gib": 2.25, "skipped_empty": 0},
    {"iteration": 2, "loss": 5.5, "lr": 2e-4, "grad_norm": 2.0, "trained_tokens": 120, "step_time_s": 0.25,
     "tokens_per_s": 8192.0, "tflops_per_gpu": 3.0, "mfu": 0.45, "mem_gib": 2.5, "skipped_empty": 2,
     "loss_by_source": {"llava": 5.0, "text": 6.0}, "note": "not a number", "update_ok": True},
    {"iteration": 4, "loss": np.float32(4.5), "mfu": None},  # sparse record, numpy scalar
]


def write(tmp_path):
    w = MetricsWriter(str(tmp_path), enabled=True)
    for r in RECORDS:
        w.log(r)
    w.close()


def test_jsonl_holds_every_value_and_null_for_none(tmp_path, capsys):
    write(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines[:2]] == RECORDS[:2]
    assert json.loads(lines[2]) == {"iteration": 4, "loss": 4.5, "mfu": None}
    assert '"mfu": null' in lines[0]
    assert len(capsys.readouterr().out.splitlines()) == 3  # one progress line per record


def test_tensorboard_scalars_and_steps(tmp_path):
    write(tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "trained_tokens", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu",
            "mem_gib", "skipped_empty", "loss_by_source/llava", "loss_by_source/text", "update_ok"} == tags

    def series(tag):
        return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]

    assert series("loss") == [(1, 6.25), (2, 5.5), (4, 4.5)]
    assert series("mfu") == [(2, 0.45)]  # None is skipped, not logged as 0
    assert series("tokens_per_s") == [(1, 4096.0), (2, 8192.0)]
    assert series("lr") == [(1, 1e-4), (2, 2e-4)]
    assert series("loss_by_source/text") == [(2, 6.0)]
    assert series("skipped_empty") == [(1, 0), (2, 2)]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "run"), enabled=False)
    w.log(RECORDS[0])
    w.close()
    assert not (tmp_path / "run").exists()


def test_progress_line_is_concise_and_tolerates_missing_keys():
    line = format_progress(RECORDS[1], total=10)
    assert line == ("iter 2/10 | loss 5.5000 | lr 2.00e-04 | gnorm 2.000 | 250 ms | 8.2k tok/s | 3.0 TFLOP/s/gpu | "
                    "MFU 45.0% | 2.5 GiB | skipped empty 2")
    assert "MFU" not in format_progress(RECORDS[0]) and "skipped" not in format_progress(RECORDS[0])
    assert format_progress({"iteration": 7}) == "iter 7"
