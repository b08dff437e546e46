"""The throughput report (megallava/report.py, tools/throughput_report.py) on a real CPU sweep of the trainer, and
the sweep tool's layout grid and SLURM lists (tools/sweep.py)."""
import json
import os
import shutil

import pytest

from megallava import config as C
from megallava import report as R
from tests.test_plan import TINY, cpu_sweep  # noqa: F401  (the shared session sweep)

PNG = b"\x89PNG\r\n\x1a\n"


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _table(md):
    """Rows of the first markdown table: {run name: {column: cell}}."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _num(cell):
    return float(cell.replace(",", "").rstrip("%"))


def test_report_numbers_equal_the_metrics_read(cpu_sweep, tmp_path):  # noqa: F811
    dirs = sorted(cpu_sweep.values())
    summary = R.write_report(dirs, str(tmp_path / "report"))
    md = (tmp_path / "report" / "report.md").read_text()
    rows = _table(md)
    layouts = {r["layout"] for r in summary["runs"]}
    assert len(rows) == len(dirs) == 9 and len(layouts) >= 5
    for name, d in cpu_sweep.items():
        recs = _records(d)
        skip = R.default_warmup(len(recs))
        assert skip == 2 and f"{name} {skip} (kept {len(recs) - skip})" in md    # the report says what it skipped
        kept = recs[skip:]
        step = sum(r["step_time_s"] for r in kept)
        tokens_per_s = sum(r["tokens"] for r in kept) / step
        launch = json.load(open(os.path.join(d, "launch.json")))
        gpus = launch["world_size"]
        cfg = C.load_config(os.path.join(d, "config.yaml"))
        row = rows[name]
        assert int(row["GPUs"]) == gpus
        assert int(row["global batch"]) == cfg.train.global_batch_size
        assert int(row["m"]) == cfg.train.global_batch_size // (cfg.train.micro_batch_size *
                                                               (gpus // (cfg.parallel.tp * cfg.parallel.pp)))
        assert _num(row["tokens/s"]) == pytest.approx(tokens_per_s, abs=0.5)
        assert _num(row["tokens/s/GPU"]) == pytest.approx(tokens_per_s / gpus, abs=0.5)
        tf = row["TFLOP/s/GPU (LLM / ViT / proj)"].replace("(", "").replace(")", "").replace("/", " ").split()
        for cell, key in zip(tf, ("tflops_per_gpu", "tflops_llm", "tflops_vit", "tflops_projector")):
            expect = sum(r[key] * r["step_time_s"] for r in kept) / step
            assert float(cell) == pytest.approx(expect, rel=1e-3), (name, key)
        assert row["MFU"] == "n/a"                                              # CPU: no peak
        mean, fastest = (float(x) for x in row["step s (mean / fastest)"].split(" / "))
        assert mean == pytest.approx(step / len(kept), abs=1e-4)
        assert fastest == pytest.approx(min(r["step_time_s"] for r in kept), abs=1e-4)
        assert float(row["peak GiB"]) == pytest.approx(max(r["mem_gib"] for r in kept), abs=0.005)
        pred = row["bubble predicted / measured"].split(" / ")[0]
        if cfg.parallel.pp == 1:
            assert pred == "0.0%"
    # summary.json carries the same numbers
    by_name = {r["name"]: r for r in summary["runs"]}
    assert by_name["tp1-pp2-dp1-mb2-gb4"]["bubble_predicted"] == pytest.approx(1 / 3)
    assert by_name["tp1-pp4-dp1-mb2-gb16"]["bubble_predicted"] == pytest.approx(3 / 11)
    assert by_name["tp1-pp2-vpp2-dp1-mb2-gb16"]["bubble_predicted"] == pytest.approx(1 / 17)
    assert by_name["tp1-pp2-dp1-mb2-gb4"]["bubble_measured"] is not None      # two micro-batch counts: fitted
    assert by_name["tp2-pp1-dp1-mb2-gb16"]["bubble_measured"] is None          # one: not measurable
    # scaling: strong against the 1-GPU run of the same global batch, weak for DP2 at twice the batch
    scale = {s["name"]: s for s in summary["scaling"]}
    ref = min(summary["runs"], key=lambda r: (r["gpus"], r["name"] != "tp1-pp1-dp1-mb2-gb4"))
    assert scale["tp1-pp1-dp1-mb2-gb4"]["strong"] == 1.0
    tp2 = by_name["tp2-pp1-dp1-mb2-gb16"]
    assert scale["tp2-pp1-dp1-mb2-gb16"]["strong"] is None                    # gb16 vs the gb4 reference
    assert scale["tp1-pp2-dp1-mb2-gb4"]["strong"] == pytest.approx(
        by_name["tp1-pp2-dp1-mb2-gb4"]["tokens_per_s"] / ref["tokens_per_s"] / 2)
    assert scale["tp1-pp1-dp2-mb2-gb32"]["weak"] is None                      # gb32 / 2 GPUs vs gb4 / 1
    assert tp2["tokens_per_s_per_gpu"] == pytest.approx(tp2["tokens_per_s"] / 2)
    # plots: real PNGs, referenced from the markdown
    assert len(summary["plots"]) == 3
    for p in summary["plots"]:
        with open(p, "rb") as f:
            data = f.read()
        assert data[:8] == PNG and len(data) > 10_000
        assert f"({os.path.basename(p)})" in md


def test_world_size_is_recovered_from_the_logged_tflops(cpu_sweep, tmp_path):  # noqa: F811
    src = cpu_sweep["tp1-pp1-dp2-mb2-gb32"]
    dst = tmp_path / "no_launch"
    shutil.copytree(src, dst)
    os.remove(dst / "launch.json")
    run = R.load_run(str(dst))
    assert run.world_size == 2 and run.world_source == "from logged TFLOP/s" and run.dp == 2


def _fake_run(path, tp, pp, gb, world, step, tokens, mb=1):
    os.makedirs(path, exist_ok=True)
    cfg = C.load_config(TINY, [f"parallel.tp={tp}", f"parallel.pp={pp}", f"train.global_batch_size={gb}",
                               f"train.micro_batch_size={mb}"])
    C.dump_yaml(cfg, os.path.join(path, "config.yaml"))
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i in range(1, 7):
            f.write(json.dumps({"iteration": i, "step_time_s": step * (3 if i <= 2 else 1), "tokens": tokens,
                                "images": 0, "tflops_per_gpu": 1.0, "tflops_llm": 1.0, "tflops_vit": 0.0,
                                "tflops_projector": 0.0, "mfu": 0.5, "mem_gib": 10.0 + i}) + "\n")
    with open(os.path.join(path, "launch.json"), "w") as f:
        json.dump({"world_size": world}, f)
    return path


def test_scaling_efficiencies_and_mfu(tmp_path):
    ref = _fake_run(str(tmp_path / "a"), 1, 1, 8, 1, 1.0, 8000)
    strong = _fake_run(str(tmp_path / "b"), 1, 1, 8, 4, 0.5, 8000)      # same batch, 4 GPUs, 2x faster: 50%
    weak = _fake_run(str(tmp_path / "c"), 1, 1, 32, 4, 1.25, 32000)    # 4x batch on 4 GPUs, 25% slower: 80%
    summary = R.write_report([ref, strong, weak], str(tmp_path / "out"), plots=False)
    s = {x["name"]: x for x in summary["scaling"]}
    assert s["b"]["strong"] == pytest.approx(0.5) and s["b"]["weak"] is None
    assert s["c"]["weak"] == pytest.approx(0.8) and s["c"]["strong"] is None
    r = {x["name"]: x for x in summary["runs"]}
    assert r["a"]["warmup_skipped"] == 2 and r["a"]["iterations"] == 4   # the 3x slower warm-up steps are left out
    assert r["a"]["tokens_per_s"] == pytest.approx(8000) and r["a"]["mfu"] == pytest.approx(0.5)
    assert r["a"]["mem_gib"] == 16.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| b | 4 | 2.00x | 50.0% | n/a | 50.0% |" in md


def test_sweep_grid_rejects_invalid_layouts_and_writes_slurm_lists(tmp_path):
    grid = R.parse_grid(["tp=1,2 pp=1,2", "gb=8"])
    assert grid == {"tp": ["1", "2"], "pp": ["1", "2"], "gb": ["8"]}
    points, rejected = R.sweep_points(TINY, grid, [2, 16], gpus_per_node=8)
    names = sorted((p.world_size, p.name) for p in points)
    assert names == [(2, "tp1-pp1-dp2-mb2-gb8"), (2, "tp1-pp2-dp1-mb2-gb8"), (2, "tp2-pp1-dp1-mb2-gb8"),
                     (16, "tp2-pp2-dp4-mb2-gb8")]
    assert any("not divisible by micro_batch_size*dp" in msg for _, _, problems in rejected for msg in problems)
    assert any("world size 2 is not divisible by tp*pp=4" in p[0] for _, _, p in rejected)
    lists = R.write_slurm_lists(TINY, points, str(tmp_path))
    assert sorted(lists) == [1, 2] and lists[2].endswith("layouts_2nodes.txt")
    lines = open(lists[1]).read().splitlines()
    assert len(lines) == 3 and all(line.split()[1] == "2" for line in lines)
    assert "parallel.tp=2" in " ".join(lines)
    assert open(lists[2]).read().split()[:2] == ["tp2-pp2-dp4-mb2-gb8", "16"]
    printed = []
    R.run_sweep(TINY, points[:1], str(tmp_path / "runs"), launcher="print", log=printed.append)
    assert printed[0].startswith("torchrun --nproc-per-node 2 -m megallava.train --config ")
    assert "train.run_dir=" in printed[0]
