"""Throughput and scaling report over training runs (``tools/throughput_report.py RUN_DIR... --out DIR``).

Each run directory is what the trainer writes: ``config.yaml`` (the resolved config) and ``metrics.jsonl`` (one
record per logged iteration: README "Train"); ``tools/sweep.py`` adds ``launch.json`` (world size, nodes, command).
The first iterations (compilation, allocator warm-up) are skipped, and the report says how many.

Per run: layout, GPUs, global batch, tokens/s (sum of tokens / sum of step times, so slow steps weigh what they
cost), tokens/s/GPU, TFLOP/s/GPU split LLM / ViT / projector, MFU, step time (mean and fastest), peak memory, and
the pipeline bubble, predicted ((p-1)/(v m + p - 1) of the pipelined time) and measured. Measured: runs of the same
layout at several micro-batch counts m give step(m) = a + b m (fitted on each run's fastest step, the least
disturbed by other load); b is one micro-batch's time per stage, and the intercept a less the fixed per-step
overhead (the intercept of the same layout at pp 1, divided by pp, e.g. the optimizer step) is the bubble:
measured = (a - c) / (step(m) - c).

Scaling, against the smallest run (fewest GPUs): strong (same global batch: speed-up / GPU ratio) and weak (same
global batch per GPU: tokens/s/GPU ratio). Plots: tokens/s/GPU and MFU vs GPUs, peak memory per GPU by layout,
step-time breakdown (fixed overhead, micro-batch work, bubble).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megallava import config as C


@dataclass
class Run:
    path: str
    name: str
    cfg: C.Config
    records: List[dict]          # kept (after warm-up)
    skipped: int                 # warm-up iterations left out
    world_size: int
    world_source: str
    launch: dict = field(default_factory=dict)

    # --- layout
    @property
    def tp(self) -> int:
        return self.cfg.parallel.tp

    @property
    def pp(self) -> int:
        return self.cfg.parallel.pp

    @property
    def vpp(self) -> Optional[int]:
        return self.cfg.parallel.vpp if self.pp > 1 else None

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def micro_batch(self) -> int:
        return self.cfg.train.micro_batch_size

    @property
    def global_batch(self) -> int:
        return self.cfg.train.global_batch_size

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def layout(self) -> str:
        p = self.cfg.parallel
        s = f"TP{self.tp} PP{self.pp}" + (f" VPP{self.vpp}" if self.vpp else "") + f" DP{self.dp} mb{self.micro_batch}"
        if p.sequence_parallel:
            s += " SP"
        if self.cfg.train.recompute != "none":
            s += f" rc:{self.cfg.train.recompute}"
        return s

    def group_key(self):
        """Runs that differ only in the micro-batch count (global batch)."""
        p = self.cfg.parallel
        return (self.tp, self.pp, self.vpp, self.dp, self.micro_batch, p.sequence_parallel, self.cfg.train.recompute)

    # --- measured
    def _sum(self, key) -> float:
        return sum(float(r[key]) for r in self.records if r.get(key) is not None)

    def step_time(self) -> float:
        return self._sum("step_time_s") / len(self.records)

    def fastest_step(self) -> float:
        return min(float(r["step_time_s"]) for r in self.records)

    def tokens_per_s(self) -> float:
        return self._sum("tokens") / self._sum("step_time_s")

    def weighted(self, key) -> Optional[float]:
        """Time-weighted mean of a per-step rate (sum(x * step) / sum(step)); None if the runs logged none."""
        pairs = [(float(r[key]), float(r["step_time_s"])) for r in self.records if r.get(key) is not None]
        if not pairs:
            return None
        return sum(x * t for x, t in pairs) / sum(t for _, t in pairs)

    def peak_memory(self) -> Optional[float]:
        vals = [float(r["mem_gib"]) for r in self.records if r.get("mem_gib") is not None]
        return max(vals) if vals else None


def _read_jsonl(path: str) -> List[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def default_warmup(n: int) -> int:
    """Iterations skipped by default: 2 (compilation, allocator warm-up), 1 for runs of 2-5 records, none for 1."""
    return 2 if n >= 6 else (1 if n >= 2 else 0)


def infer_world_size(cfg, records: List[dict]) -> Optional[int]:
    """The number of GPUs from the logged per-GPU TFLOP/s: the ViT and projector FLOPs of a step depend only on the
    image count, so world = those FLOPs / (tflops_vit + tflops_projector) / step time, exactly (up to rounding)."""
    from megallava.training.flops import step_flops
    for r in records:
        images = r.get("images") or 0
        tv = (r.get("tflops_vit") or 0) + (r.get("tflops_projector") or 0)
        if images and tv > 0:
            f = step_flops(cfg, [], int(images))
            world = (f["vit"] + f["projector"]) / (tv * 1e12 * float(r["step_time_s"]))
            return max(1, int(round(world)))
    return None


def load_run(path: str, warmup: Optional[int] = None, world_size: Optional[int] = None) -> Run:
    cfg_path, metrics_path = os.path.join(path, "config.yaml"), os.path.join(path, "metrics.jsonl")
    for p in (cfg_path, metrics_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path}: no {os.path.basename(p)} (not a megallava run directory?)")
    cfg = C.load_config(cfg_path)
    records = [r for r in _read_jsonl(metrics_path) if r.get("step_time_s")]
    if not records:
        raise ValueError(f"{path}: metrics.jsonl has no iterations")
    # a resumed run appends: keep the last record of each iteration
    by_iter = {}
    for r in records:
        by_iter[int(r["iteration"])] = r
    records = [by_iter[k] for k in sorted(by_iter)]
    skip = default_warmup(len(records)) if warmup is None else min(warmup, len(records) - 1)
    launch = {}
    launch_path = os.path.join(path, "launch.json")
    if os.path.isfile(launch_path):
        with open(launch_path) as f:
            launch = json.load(f)
    if world_size:
        world, source = world_size, "given"
    elif launch.get("world_size"):
        world, source = int(launch["world_size"]), "launch.json"
    else:
        world = infer_world_size(cfg, records)
        source = "from logged TFLOP/s"
        if world is None:
            world, source = cfg.parallel.tp * cfg.parallel.pp, "assumed dp=1"
    name = os.path.basename(os.path.normpath(path))
    return Run(path, name, cfg, records[skip:], skip, world, source, launch)


# ------------------------------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------------------------------

def _fit(points):
    """Least squares y = a + b x over (x, y) points; None with fewer than two distinct x."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def pipeline_fits(runs: Sequence[Run]) -> Dict[tuple, tuple]:
    """(a, b) of step(m) = a + b m per layout group, on each run's fastest step."""
    groups: Dict[tuple, list] = {}
    for r in runs:
        groups.setdefault(r.group_key(), []).append((r.microbatches, r.fastest_step()))
    return {k: f for k, pts in groups.items() if (f := _fit(pts)) is not None}


def bubble(run: Run, fits: Dict[tuple, tuple]) -> Dict[str, Optional[float]]:
    """Predicted and measured bubble share of the pipelined time (see the module docstring)."""
    from megallava.plan import predicted_bubble_fraction
    pred = predicted_bubble_fraction(run.pp, run.vpp, run.microbatches) if run.pp > 1 else 0.0
    out = {"predicted": pred, "measured": None, "overhead_s": None, "per_microbatch_s": None}
    fit = fits.get(run.group_key())
    if fit is None:
        return out
    a, b = fit
    key1 = (run.tp, 1, None, run.dp, run.micro_batch, run.cfg.parallel.sequence_parallel, run.cfg.train.recompute)
    ref = fits.get(key1)
    c = max(ref[0], 0.0) / run.pp if ref is not None else 0.0
    if run.pp == 1:
        c = max(a, 0.0)
    step = run.fastest_step()
    out["overhead_s"], out["per_microbatch_s"] = c, b
    if run.pp > 1:
        out["measured"] = max(a - c, 0.0) / max(step - c, 1e-12)
    else:
        out["measured"] = 0.0
    return out


@dataclass
class Row:
    run: Run
    values: Dict[str, Optional[float]]


def summarize(runs: Sequence[Run], peak_tflops: Optional[float] = None) -> List[Row]:
    fits = pipeline_fits(runs)
    rows = []
    for r in runs:
        tps = r.tokens_per_s()
        tf = {k: r.weighted(f"tflops_{k}") for k in ("llm", "vit", "projector")}
        total = r.weighted("tflops_per_gpu")
        mfu = r.weighted("mfu")
        if mfu is None and peak_tflops and total is not None:
            mfu = total / peak_tflops
        b = bubble(r, fits)
        rows.append(Row(r, {
            "gpus": r.world_size, "global_batch": r.global_batch, "microbatches": r.microbatches,
            "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / r.world_size,
            "tflops_per_gpu": total, "tflops_llm": tf["llm"], "tflops_vit": tf["vit"],
            "tflops_projector": tf["projector"], "mfu": mfu, "step_s": r.step_time(),
            "fastest_step_s": r.fastest_step(), "mem_gib": r.peak_memory(),
            "bubble_predicted": b["predicted"], "bubble_measured": b["measured"],
            "overhead_s": b["overhead_s"], "per_microbatch_s": b["per_microbatch_s"],
            "iterations": len(r.records), "warmup_skipped": r.skipped}))
    return rows


def scaling(rows: Sequence[Row]) -> List[Dict[str, Optional[float]]]:
    """Strong and weak scaling efficiency of each run against the smallest (fewest GPUs, then first given)."""
    ref = min(rows, key=lambda x: x.run.world_size)
    g0, b0 = ref.run.world_size, ref.run.global_batch
    t0 = ref.values["tokens_per_s"]
    out = []
    for row in rows:
        g, b = row.run.world_size, row.run.global_batch
        tps = row.values["tokens_per_s"]
        strong = (tps / t0) / (g / g0) if b == b0 else None
        weak = (tps / g) / (t0 / g0) if b * g0 == b0 * g else None
        out.append({"name": row.run.name, "gpus": g, "reference": ref.run.name, "speedup": tps / t0,
                    "strong": strong, "weak": weak, "per_gpu_vs_ref": (tps / g) / (t0 / g0)})
    return out


# ------------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------------

def _f(x, fmt="{:,.1f}", none="n/a"):
    return none if x is None else fmt.format(x)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


TABLE_COLUMNS = ("run", "layout", "GPUs", "global batch", "m", "tokens/s", "tokens/s/GPU",
                 "TFLOP/s/GPU (LLM / ViT / proj)", "MFU", "step s (mean / fastest)", "peak GiB",
                 "bubble predicted / measured")


def markdown(rows: Sequence[Row], scale: Sequence[dict], plots: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    lines = ["# Throughput report", ""]
    skipped = sorted({r.run.skipped for r in rows})
    lines.append(f"{len(rows)} runs. Warm-up iterations skipped per run: "
                 + ", ".join(f"{r.run.name} {r.run.skipped} (kept {len(r.run.records)})" for r in rows) + ".")
    lines.append(f"(skipped counts: {', '.join(map(str, skipped))}; tokens/s = sum of tokens / sum of step times over "
                 f"the kept iterations; TFLOP/s and MFU time-weighted; GPUs from launch.json or the logged TFLOP/s.)")
    lines.append("")
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "---|" * len(TABLE_COLUMNS))
    for row in rows:
        v = row.values
        tf = (f"{_f(v['tflops_per_gpu'], '{:.4g}')} ({_f(v['tflops_llm'], '{:.4g}')} / "
              f"{_f(v['tflops_vit'], '{:.4g}')} / {_f(v['tflops_projector'], '{:.4g}')})")
        lines.append("| " + " | ".join([
            row.run.name, row.run.layout(), str(v["gpus"]), str(v["global_batch"]), str(v["microbatches"]),
            _f(v["tokens_per_s"], "{:,.0f}"), _f(v["tokens_per_s_per_gpu"], "{:,.0f}"), tf, _pct(v["mfu"]),
            f"{v['step_s']:.4f} / {v['fastest_step_s']:.4f}", _f(v["mem_gib"], "{:.2f}"),
            f"{_pct(v['bubble_predicted'])} / {_pct(v['bubble_measured'])}"]) + " |")
    lines += ["", "## Scaling (against the smallest run)", "",
              "| run | GPUs | speed-up | strong efficiency | weak efficiency | tokens/s/GPU vs reference |",
              "|---|---|---|---|---|---|"]
    for s in scale:
        lines.append(f"| {s['name']} | {s['gpus']} | {s['speedup']:.2f}x | {_pct(s['strong'])} | {_pct(s['weak'])} | "
                     f"{_pct(s['per_gpu_vs_ref'])} |")
    lines += ["", f"Reference: {scale[0]['reference'] if scale else 'n/a'}. Strong: same global batch, efficiency = "
              "speed-up / GPU ratio. Weak: same global batch per GPU, efficiency = tokens/s/GPU ratio. n/a: the run "
              "does not match that definition.", ""]
    lines += ["Pipeline bubble: share of the pipelined time (step less the fixed per-step overhead). Predicted "
              "(p-1)/(v m + p - 1); measured from step(m) = a + b m fitted over runs of the same layout (n/a with "
              "fewer than two micro-batch counts).", ""]
    for n in notes:
        lines.append(f"- {n}")
    for p in plots:
        lines.append(f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    labels = [f"{r.run.layout()} m{r.run.microbatches}" for r in rows]
    gpus = [r.values["gpus"] for r in rows]
    # 1. tokens/s/GPU and MFU vs GPUs
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    tpg = [r.values["tokens_per_s_per_gpu"] for r in rows]
    axes[0].scatter(gpus, tpg, s=50)
    for x, y, lab in zip(gpus, tpg, labels):
        axes[0].annotate(lab, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes[0].set_xlabel("GPUs")
    axes[0].set_ylabel("tokens/s per GPU")
    axes[0].set_title("Throughput per GPU")
    axes[0].grid(alpha=0.3)
    mfu = [r.values["mfu"] for r in rows]
    if any(m is not None for m in mfu):
        ys, ylabel, title = [100 * (m or 0) for m in mfu], "MFU (%)", "Model FLOPs utilisation"
    else:
        ys = [r.values["tflops_per_gpu"] or 0 for r in rows]
        ylabel, title = "model TFLOP/s per GPU", "TFLOP/s per GPU (MFU n/a: no peak known)"
    axes[1].scatter(gpus, ys, s=50, color="tab:orange")
    for x, y, lab in zip(gpus, ys, labels):
        axes[1].annotate(lab, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes[1].set_xlabel("GPUs")
    axes[1].set_ylabel(ylabel)
    axes[1].set_title(title)
    axes[1].grid(alpha=0.3)
    for ax in axes:
        ax.set_xticks(sorted(set(gpus)))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "throughput_vs_gpus.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # 2. memory per GPU by layout
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    mem = [r.values["mem_gib"] or 0 for r in rows]
    names = [f"{r.run.name}: {lab}" for r, lab in zip(rows, labels)]
    ax.barh(names, mem, color="tab:green")
    for i, m in enumerate(mem):
        ax.text(m, i, f" {m:.2f}", va="center", fontsize=8)
    ax.set_xlabel("peak memory per GPU (GiB; RSS on CPU)")
    ax.set_title("Memory per GPU by layout")
    ax.invert_yaxis()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "memory_by_layout.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # 3. step-time breakdown
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.8))
    overhead, work, bub, other = [], [], [], []
    for r in rows:
        v = r.values
        step = v["fastest_step_s"]
        if v["per_microbatch_s"] is not None:
            c = v["overhead_s"] or 0.0
            w = min(r.run.microbatches * v["per_microbatch_s"], step)
            bb = max(step - c - w, 0.0) if r.run.pp > 1 else 0.0
            overhead.append(c)
            work.append(w)
            bub.append(bb)
            other.append(max(step - c - w - bb, 0.0))
        else:
            overhead.append(0.0)
            work.append(0.0)
            bub.append(0.0)
            other.append(step)
    left = [0.0] * len(rows)
    for vals, lab, col in ((overhead, "fixed per step (optimizer, ...)", "tab:gray"),
                           (work, "micro-batch work (m x per-stage time)", "tab:blue"),
                           (bub, "pipeline bubble (measured)", "tab:red"),
                           (other, "step (no fit: one micro-batch count)", "tab:olive")):
        if any(x > 0 for x in vals):
            ax.barh(names, vals, left=left, label=lab, color=col)
            left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        pb = r.values["bubble_predicted"]
        if r.run.pp > 1 and r.values["per_microbatch_s"] is not None:
            c = r.values["overhead_s"] or 0.0
            x = c + (r.values["fastest_step_s"] - c) * (1 - pb)
            ax.plot([x], [i], marker="|", markersize=14, color="black")
    ax.plot([], [], marker="|", linestyle="none", markersize=12, color="black", label="predicted bubble starts here")
    ax.set_xlabel("seconds per step (fastest step)")
    ax.set_title("Step-time breakdown")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "step_breakdown.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(run_dirs: Sequence[str], out_dir: str, warmup: Optional[int] = None,
                 peak_tflops: Optional[float] = None, world_sizes: Optional[Dict[str, int]] = None,
                 plots: bool = True) -> dict:
    """Read the runs, write ``report.md``, ``summary.json`` and the PNG plots to ``out_dir``; return the summary."""
    runs = [load_run(d, warmup, (world_sizes or {}).get(d)) for d in run_dirs]
    runs.sort(key=lambda r: (r.world_size, r.pp, r.tp, r.microbatches, r.name))
    rows = summarize(runs, peak_tflops)
    scale = scaling(rows)
    os.makedirs(out_dir, exist_ok=True)
    pngs = plot(rows, out_dir) if plots else []
    notes = [f"{r.run.name}: GPUs {r.run.world_size} ({r.run.world_source})" for r in rows]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(rows, scale, pngs, notes))
    summary = {"runs": [{"name": r.run.name, "path": r.run.path, "layout": r.run.layout(), **r.values} for r in rows],
               "scaling": scale, "plots": pngs}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="tools/throughput_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each with config.yaml and metrics.jsonl)")
    p.add_argument("--out", required=True, help="output directory for report.md, summary.json and PNGs")
    p.add_argument("--warmup", type=int, help="iterations to skip per run (default 2; 1 for runs of < 6)")
    p.add_argument("--peak-tflops", type=float, help="per-GPU peak for MFU when the runs logged none")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    summary = write_report(args.runs, args.out, args.warmup, args.peak_tflops, plots=not args.no_plots)
    print(f"wrote {os.path.join(args.out, 'report.md')} ({len(summary['runs'])} runs"
          + (f", {len(summary['plots'])} plots" if summary["plots"] else "") + ")")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# Sweeps: the report's inputs (tools/sweep.py, examples/slurm/sweep_array.sbatch)
# ------------------------------------------------------------------------------------------------------------------

GRID_KEYS = {"tp": "parallel.tp", "pp": "parallel.pp", "vpp": "parallel.vpp", "mb": "train.micro_batch_size",
             "gb": "train.global_batch_size", "recompute": "train.recompute", "sp": "parallel.sequence_parallel"}


@dataclass
class SweepPoint:
    name: str
    world_size: int
    overrides: List[str]
    nodes: int = 1


def parse_grid(spec: Sequence[str]) -> Dict[str, List[str]]:
    """["tp=1,2", "pp=1,2,4", "mb=2"] -> {"tp": ["1", "2"], ...}; keys: tp pp vpp mb gb recompute sp, or any dotted
    config key."""
    grid: Dict[str, List[str]] = {}
    for item in spec:
        for part in item.split():
            key, sep, values = part.partition("=")
            if not sep or not values:
                raise ValueError(f"grid entry {part!r} is not key=v1,v2,...")
            grid[key] = values.split(",")
    return grid


def sweep_points(config_path: Optional[str], grid: Dict[str, List[str]], gpus: Sequence[int],
                 base_overrides: Sequence[str] = (), gpus_per_node: int = 8):
    """Every (layout, world size) of the grid the trainer accepts (config.validate), named
    ``tp{..}-pp{..}[-vpp{..}]-dp{..}-mb{..}-gb{..}[-{recompute}]``; also returns the rejected ones with the reason."""
    import itertools
    keys = list(grid)
    points, rejected = [], []
    for world in gpus:
        for values in itertools.product(*(grid[k] for k in keys)):
            ov = list(base_overrides) + [f"{GRID_KEYS.get(k, k)}={v}" for k, v in zip(keys, values)]
            try:
                cfg = C.load_config(config_path, ov)
                C.validate(cfg, world)
            except C.ConfigError as err:
                rejected.append((world, ov, err.problems))
                continue
            p, t = cfg.parallel, cfg.train
            dp = world // (p.tp * p.pp)
            name = f"tp{p.tp}-pp{p.pp}" + (f"-vpp{p.vpp}" if p.vpp and p.pp > 1 else "") + \
                f"-dp{dp}-mb{t.micro_batch_size}-gb{t.global_batch_size}" + \
                ("-sp" if p.sequence_parallel else "") + (f"-{t.recompute}" if t.recompute != "none" else "")
            if any(q.name == name for q in points):
                continue
            points.append(SweepPoint(name, world, ov, max(1, -(-world // gpus_per_node))))
    return points, rejected


def run_sweep(config_path: str, points: Sequence[SweepPoint], out_dir: str, launcher: str = "torchrun",
              force: bool = False, timeout: float = 3600, log=print) -> List[str]:
    """Run every point (skipping those whose launch.json says it finished, unless ``force``) and return the run
    directories that finished. ``launcher``: ``torchrun`` (one node, ``--nproc-per-node`` = world size), ``fork``
    (ranks forked from this process: CPU smoke sweeps), or ``print`` (show the commands only)."""
    import shlex
    import subprocess
    import sys
    import time
    done = []
    for pt in points:
        run_dir = os.path.join(out_dir, pt.name)
        launch_path = os.path.join(run_dir, "launch.json")
        overrides = list(pt.overrides) + [f"train.run_dir={run_dir}"]
        cmd = ["torchrun", "--nproc-per-node", str(pt.world_size), "-m", "megallava.train", "--config",
               config_path] + overrides
        if launcher == "print":
            log(" ".join(shlex.quote(c) for c in cmd))
            continue
        if not force and os.path.isfile(launch_path):
            with open(launch_path) as f:
                if json.load(f).get("status") == "ok":
                    log(f"{pt.name}: done already")
                    done.append(run_dir)
                    continue
        if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            os.remove(os.path.join(run_dir, "metrics.jsonl"))  # a fresh run, not appended to an old one
        os.makedirs(run_dir, exist_ok=True)
        t0 = time.time()
        status = "ok"
        if launcher == "fork":
            from megallava.local_ranks import run_ranks

            def fn(rank, env, overrides=overrides):
                from megallava.training.train import run
                cfg = C.load_config(config_path, overrides)
                C.validate(cfg, env.world_size)
                run(cfg, env)
                return True
            try:
                run_ranks(pt.world_size, fn, timeout=timeout)
            except RuntimeError as err:
                status = f"failed: {str(err).splitlines()[-1]}"
        elif launcher == "torchrun":
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
            cmd[0] = torchrun if os.path.exists(torchrun) else "torchrun"
            with open(os.path.join(run_dir, "train.log"), "w") as logf:
                rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            status = "ok" if rc == 0 else f"failed: exit {rc} (see {run_dir}/train.log)"
        else:
            raise ValueError(f"unknown launcher {launcher!r}: torchrun, fork or print")
        with open(launch_path, "w") as f:
            json.dump({"world_size": pt.world_size, "nodes": pt.nodes, "launcher": launcher, "config": config_path,
                       "overrides": pt.overrides, "command": " ".join(shlex.quote(c) for c in cmd),
                       "seconds": round(time.time() - t0, 2), "status": status}, f, indent=1)
        log(f"{pt.name}: {status} ({time.time() - t0:.1f} s)")
        if status == "ok":
            done.append(run_dir)
    return done


def write_slurm_lists(config_path: str, points: Sequence[SweepPoint], out_dir: str) -> Dict[int, str]:
    """One file per node count for examples/slurm/sweep_array.sbatch: a line per run, ``NAME WORLD OVERRIDES...``.
    Returns {nodes: path}."""
    os.makedirs(out_dir, exist_ok=True)
    by_nodes: Dict[int, List[SweepPoint]] = {}
    for pt in points:
        by_nodes.setdefault(pt.nodes, []).append(pt)
    paths = {}
    for nodes, pts in sorted(by_nodes.items()):
        path = os.path.join(out_dir, f"layouts_{nodes}node{'s' if nodes > 1 else ''}.txt")
        with open(path, "w") as f:
            for pt in pts:
                f.write(" ".join([pt.name, str(pt.world_size)] + pt.overrides) + "\n")
        paths[nodes] = path
    return paths
