"""The layout planner (megallava/plan.py) against what the trainer really allocates, saves and spends.

- parameters + grads + optimizer states: predicted bytes == the bytes of every storage behind the built, wrapped
  and stepped model on each rank (TP2xPP2, TP1xPP2xDP2 in bf16 with master weights, QLoRA at TP2), exactly;
- activations: predicted saved bytes of one micro-batch vs the storages autograd saves during its forward
  (saved_tensors_hooks), recompute none/selective/full, LoRA, stage 1, GQA, TP2, TP2+SP and the two PP2 stages:
  band 1% (they are equal on this CPU path);
- the H200 bench: predicted peak memory and step time of the measured settings;
- the pipeline bubble vs step times of the trainer at PP 1/2/4 with 2 and 8 micro-batches;
- the paper's fit / no-fit answers (ZeRO-2 65B LoRA OOM, QLoRA fits) and the planner's layouts for them.
"""
import copy
import glob
import json
import os

import pytest

from megallava import config as C
from megallava import plan as P
from megallava import report as R
from tests.multirank import run_ranks

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")


@pytest.fixture(scope="session", autouse=True)
def plan_cache(tmp_path_factory):
    """A fresh structure cache: every meta build these tests rely on really runs."""
    old = os.environ.get("MEGALLAVA_CACHE")
    os.environ["MEGALLAVA_CACHE"] = str(tmp_path_factory.mktemp("plan_cache"))
    P._structure_cache.cache_clear()
    yield
    P._structure_cache.cache_clear()
    if old is None:
        os.environ.pop("MEGALLAVA_CACHE", None)
    else:
        os.environ["MEGALLAVA_CACHE"] = old


# ------------------------------------------------------------------------------------------ static memory, exact
def _built_static(overrides, world, qlora=False):
    def fn(rank, env):
        from megatron.core import parallel_state as ps
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks
        from megallava.training.optimizer import build_optimizer, wrap_ddp
        from megallava.training.step import train_step
        from megallava.training.train import data_iterators

        cfg = C.load_config(TINY, overrides)
        C.validate(cfg, env.world_size)
        init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, cfg.train.seed, env)
        chunks = build_chunks(cfg)
        if qlora:
            from megallava.model.lora import quantize_bases
            quantize_bases(chunks)
        model = wrap_ddp(chunks, cfg)
        opt, sched = build_optimizer(model, cfg)
        its = data_iterators(cfg, chunks, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        train_step(model, opt, sched, its, C.num_microbatches(cfg, env.world_size), cfg.train.micro_batch_size,
                   cfg.data.seq_length)  # one step: Adam's states exist
        return ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), \
            P.measured_static_bytes(model, opt), sum(p.numel() for c in chunks for p in c.parameters())

    return run_ranks(world, fn)


@pytest.mark.parametrize("overrides,world,qlora,param_bytes", [
    (["parallel.tp=2", "parallel.pp=2"], 4, False, 4),
    (["parallel.tp=1", "parallel.pp=2", "train.precision=bf16"], 4, False, 2),   # DP2: optimizer shards differ
    (["parallel.tp=2", "parallel.pp=1", "lora.rank=4", "lora.quantize=true"], 2, True, 4),
], ids=["tp2pp2_fp32", "tp1pp2dp2_bf16_master", "tp2_qlora"])
def test_static_memory_is_exact_on_every_rank(overrides, world, qlora, param_bytes):
    cfg = C.load_config(TINY, overrides)
    layout = P.layout_from_config(cfg, world)
    results = _built_static(overrides, world, qlora)
    assert len(results) == world
    for pp_rank, dp_rank, measured, _ in results:
        pred = P.static_memory(cfg, layout, pp_rank, dp_rank, param_bytes=param_bytes)
        assert (pred.params, pred.grads, pred.optimizer) == \
            (measured["params"], measured["grads"], measured["optimizer"]), (pp_rank, dp_rank, measured, pred)
    if world == 4 and "train.precision=bf16" in overrides:
        # the two DP ranks of a stage hold different optimizer shards (padding lands on the last): still exact
        by_stage = {}
        for pp_rank, dp_rank, measured, _ in results:
            by_stage.setdefault(pp_rank, set()).add(measured["optimizer"])
        assert any(len(v) == 2 for v in by_stage.values())


# ------------------------------------------------------------------------------------------ activations
def _saved_bytes(cases, world, tp, pp):
    """Per case (overrides): (measured saved bytes of one forward of this rank's chunk, tokens shape, images)."""
    def fn(rank, env):
        import torch
        from megatron.core import parallel_state as ps
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks
        from megallava.training.train import data_iterators

        init_distributed(tp, pp, None, 0, env)
        out = []
        for overrides in cases:
            cfg = C.load_config(TINY, [f"parallel.tp={tp}", f"parallel.pp={pp}"] + overrides)
            chunk = build_chunks(cfg)[0]
            chunk.train()
            # the micro-batch the first stage reads (the last stage reads the same rows' labels)
            first = copy.deepcopy(cfg)
            first.parallel.pp = 1
            batch = next(iter(data_iterators(first, [type("c", (), {"pre_process": True, "post_process": True})()],
                                             0, 1)[0]))
            b, s = batch["tokens"].shape
            if not chunk.pre_process:
                h = cfg.model.hidden_size
                ts = tp if cfg.parallel.sequence_parallel else 1
                chunk.set_input_tensor(torch.randn(s // ts, b, h, requires_grad=True))
            with P.SavedTensorBytes(chunk.parameters()) as saved:
                y = chunk(tokens=batch["tokens"] if chunk.pre_process else None,
                          images=batch["images"] if chunk.pre_process else None,
                          labels=batch["labels"] if chunk.post_process else None)
            measured = saved.bytes
            if not chunk.post_process and y.untyped_storage().data_ptr() not in saved.storages:
                measured += y.untyped_storage().nbytes()   # the stage output, which the schedule keeps
            y.float().sum().backward()
            out.append((measured, (b, s), int(batch["num_images"]), ps.get_pipeline_model_parallel_rank()))
        return out

    return run_ranks(world, fn)


def _predicted_saved(overrides, tp, pp, shape, images, pp_rank):
    cfg = P.resolve_kernels(C.load_config(TINY, [f"parallel.tp={tp}", f"parallel.pp={pp}"] + overrides), gpu=False)
    layout = P.layout_from_config(cfg, tp * pp)
    n, pre, post = P.rank_chunks(cfg, layout, pp_rank)[0]
    return sum(P.chunk_activation_bytes(cfg, layout, P.Tokens(shape[0], shape[1], images), 4, n, pre, post).values())


BAND = 0.01  # stated band: 1% (equal on this CPU path; see docs/planner.md for the GPU kernels' paths)

ONE_RANK = [[], ["train.recompute=selective"], ["train.recompute=selective", "train.recompute_modules=[core_attn,mlp]"],
            ["train.recompute=full"], ["lora.rank=4"], ["model.train_llm=false"], ["model.num_query_groups=4"]]


def test_activation_bytes_match_saved_tensors():
    rows = []
    for cases, world, tp, pp in ((ONE_RANK, 1, 1, 1),
                                 ([[], ["parallel.sequence_parallel=true"], ["train.recompute=full"]], 2, 2, 1),
                                 ([[], ["train.recompute=selective"]], 2, 1, 2)):
        results = _saved_bytes(cases, world, tp, pp)
        for rank_results in (results if pp > 1 else results[:1]):
            for overrides, (measured, shape, images, pp_rank) in zip(cases, rank_results):
                pred = _predicted_saved(overrides, tp, pp, shape, images, pp_rank)
                rows.append((f"tp{tp} pp{pp} rank{pp_rank} {' '.join(overrides) or 'none'}", pred, measured))
    for name, pred, measured in rows:
        assert measured > 0
        assert abs(pred / measured - 1) <= BAND, (name, pred, measured)
    # recompute really trades memory: full < selective(core_attn, mlp) < none
    one = {name: measured for name, _, measured in rows if name.startswith("tp1 pp1")}
    assert one["tp1 pp1 rank0 train.recompute=full"] < \
        one["tp1 pp1 rank0 train.recompute=selective train.recompute_modules=[core_attn,mlp]"] < one["tp1 pp1 rank0 none"]


# ------------------------------------------------------------------------------------------ H200 bench calibration
BENCH = ["model.num_layers=8", "model.projector=mlp2x_gelu", "train.precision=bf16", "train.global_batch_size=4"]
MEASURED_GIB = {("none", True): 43.37, ("full", True): 34.83, ("none", False): 25.60, ("full", False): 17.06}


def test_bench_memory_and_step_time():
    calib = P.calibration(os.path.join(ROOT, "bench", "results", "h200"))
    assert calib.compute_efficiency == pytest.approx(P.calibration().compute_efficiency, rel=1e-9)
    assert calib.compute_efficiency == pytest.approx(0.522, abs=0.001)
    cl = P.cluster("h200-141gb", 1, 1)
    wl = P.Workload(4, 2048, 2048, 1.0)
    steps = {}
    for (rc, master), gib in MEASURED_GIB.items():
        extra = [] if master else ["train.master_weights=false", "parallel.use_distributed_optimizer=false"]
        cfg = C.load_config(None, BENCH + extra)
        layout = P.Layout(1, 1, None, 1, 4, rc, ("core_attn",), False, None, master, False)
        est = P.estimate(cfg, layout, cl, wl, calib)
        assert est.memory_by_stage[0]["trainable"] == P.BENCH_H200["trainable"]
        assert est.memory_gib == pytest.approx(gib, rel=0.01), (rc, master, est.memory_gib, gib)
        steps[rc, master] = est.step_s
    assert steps["none", True] == pytest.approx(P.BENCH_H200["step_s"], rel=1e-6)      # the calibration point
    # full recompute: predicted from executed FLOPs alone, 4.3% slower than measured
    assert steps["full", True] == pytest.approx(P.BENCH_H200["recompute_full_step_s"], rel=0.05)


# ------------------------------------------------------------------------------------------ pipeline bubble
SWEEP_MODEL = ["model.num_layers=8", "model.hidden_size=128", "model.ffn_hidden_size=352", "data.seq_length=128",
               "train.micro_batch_size=2", "train.iters=6", "train.log_interval=1"]
PIPE_POINTS = [({"tp": ["1"], "pp": [pp], "gb": ["4", "16"]}, int(pp)) for pp in ("1", "2", "4")]
OTHER_POINTS = [({"tp": ["2"], "pp": ["1"], "gb": ["16"]}, 2), ({"tp": ["1"], "pp": ["1"], "gb": ["32"]}, 2),
                ({"tp": ["1"], "pp": ["2"], "vpp": ["2"], "gb": ["16"]}, 2)]


def _points(specs):
    pts = []
    for grid, world in specs:
        got, rejected = R.sweep_points(TINY, grid, [world], SWEEP_MODEL)
        assert got and not rejected, rejected
        pts += got
    return pts


@pytest.fixture(scope="session")
def cpu_sweep(tmp_path_factory):
    """A real sweep of the trainer on CPU (tools/sweep.py's library, forked ranks): PP 1/2/4 at 2 and 8
    micro-batches, TP2, DP2 (weak scaling), PP2 x VPP2. Returns {name: run_dir}."""
    if "runs" not in _SWEEP:   # test_report.py imports this fixture: run the sweep once per session
        out = str(tmp_path_factory.mktemp("sweep"))
        pts = _points(PIPE_POINTS + OTHER_POINTS)
        done = R.run_sweep(TINY, pts, out, launcher="fork", log=lambda *_: None)
        assert len(done) == len(pts) == 9
        _SWEEP["runs"] = {os.path.basename(d): d for d in done}
    return _SWEEP["runs"]


_SWEEP: dict = {}


def _fastest(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = [json.loads(line)["step_time_s"] for line in f if line.strip()]
    return min(times[1:])  # the first iteration warms up; the fastest step is the least disturbed by other load


def _measured_bubbles(times):
    """step(m) = a + b m per pp (two micro-batch counts); fixed overhead c = a(pp=1) / pp; bubble share at m =
    (a - c) / (step(m) - c)."""
    out = {}
    a1 = None
    for pp in (1, 2, 4):
        b = (times[pp, 8] - times[pp, 2]) / 6
        a = times[pp, 2] - 2 * b
        a1 = a if pp == 1 else a1
        c = max(a1, 0.0) / pp
        for m in (2, 8):
            out[pp, m] = max(a - c, 0.0) / (times[pp, m] - c)
    return out


ERROR = 0.12  # stated: measured bubble share within 0.12 (absolute) of (p-1)/(m + p - 1)


def _bubble_ok(meas, cores):
    """pp stages with a processor each (pp <= cores): |measured - predicted| <= ERROR, smaller with more
    micro-batches, bigger with a deeper pipeline. pp > cores (PP4 on a 2-core machine): the ranks share the cores,
    so one stage's idle time is spent by another and the formula, which assumes a processor per stage, is an upper
    bound: checked as a bound and for its trend in m."""
    checks = []
    for pp in (2, 4):
        for m in (2, 8):
            pred = P.predicted_bubble_fraction(pp, None, m)
            if pp <= cores:
                checks.append(abs(meas[pp, m] - pred) <= ERROR)
            else:
                checks.append(meas[pp, m] <= pred + ERROR)
        checks.append(meas[pp, 2] > meas[pp, 8])
    if cores >= 4:
        checks += [meas[4, 2] > meas[2, 2], meas[4, 8] > meas[2, 8]]
    return all(checks)


def test_bubble_prediction_vs_measured_step_times(cpu_sweep, tmp_path):
    names = {(pp, m): f"tp1-pp{pp}-dp1-mb2-gb{2 * m}" for pp in (1, 2, 4) for m in (2, 8)}
    times = {k: _fastest(cpu_sweep[n]) for k, n in names.items()}
    cores = len(os.sched_getaffinity(0))
    for attempt in range(3):
        meas = _measured_bubbles(times)
        if _bubble_ok(meas, cores) or attempt == 2:
            break
        # a machine busy with other work: rerun the pipeline points and keep each one's fastest step
        out = str(tmp_path / f"retry{attempt}")
        R.run_sweep(TINY, _points(PIPE_POINTS), out, launcher="fork", log=lambda *_: None)
        times = {k: min(times[k], _fastest(os.path.join(out, n))) for k, n in names.items()}
    print("bubble share (measured, predicted):",
          {k: (round(meas[k], 3), round(P.predicted_bubble_fraction(k[0], None, k[1]), 3)) for k in meas if k[0] > 1},
          f"cores {cores}")
    assert P.predicted_bubble_fraction(2, None, 2) == pytest.approx(1 / 3)
    assert P.predicted_bubble_fraction(4, 2, 8) == pytest.approx(3 / 19)
    assert all(meas[1, m] == 0.0 for m in (2, 8))
    for m in (2, 8):
        assert abs(meas[2, m] - P.predicted_bubble_fraction(2, None, m)) <= ERROR, (m, meas[2, m])
    assert _bubble_ok(meas, cores), meas


# ------------------------------------------------------------------------------------------ the paper's settings
def test_paper_fit_answers_on_a100_80gb_nodes():
    """REFERENCE.md: 65B LoRA ran out of memory under ZeRO-2 on 2 nodes, QLoRA fit; 33B LoRA/QLoRA ran on one
    node, full fine-tuning of both on 4 nodes under ZeRO-3. The ZeRO emulation agrees; with TP/PP the 65B LoRA base
    is sharded, so megallava fits it on the same 2 nodes (docs/planner.md)."""
    usable = P.cluster("a100-80gb", 1).usable_gib
    z = {}
    for model, method, zero, gpus in (("65b", "lora-64", 2, 16), ("65b", "qlora-64", 2, 16), ("33b", "lora-64", 2, 8),
                                      ("33b", "qlora-64", 2, 8), ("33b", "full", 3, 32), ("65b", "full", 3, 32)):
        cfg = P.workload_config(model, 2, method)
        z[model, method] = P.zero_memory_gib(cfg, zero, gpus)
    assert z["65b", "lora-64"]["total"] > usable            # OOM, as in the paper
    assert z["65b", "lora-64"]["weights"] > 120              # the replicated bf16 base alone: 65.6B x 2 bytes
    for key in (("65b", "qlora-64"), ("33b", "lora-64"), ("33b", "qlora-64"), ("33b", "full"), ("65b", "full")):
        assert z[key]["total"] < usable, (key, z[key])
    assert round(z["65b", "lora-64"]["trainable"] / 1e9, 2) == 0.81
    assert round(z["33b", "lora-64"]["trainable"] / 1e9, 2) == 0.49
    # megallava's layouts on the same nodes
    cl2 = P.cluster("a100-80gb", nodes=2)
    cfg = P.workload_config("65b", 2, "lora-64")
    wl = P.default_workload(cfg)
    fits = P.estimate(cfg, P.Layout(2, 2, None, 4, 1, "none", ("core_attn",), True, None, True, True), cl2, wl)
    replicated = P.estimate(cfg, P.Layout(1, 1, None, 16, 1, "full", ("core_attn",), False, None, True, True), cl2, wl)
    assert fits.fits and fits.memory_gib < 60
    assert not replicated.fits and replicated.memory_by_stage[0]["params"] > 120   # like ZeRO-2: the base replicated
    cl4 = P.cluster("a100-80gb", nodes=4)
    full = P.workload_config("65b", 2, "full")
    ok = P.estimate(full, P.Layout(8, 4, None, 1, 1, "none", ("core_attn",), True, None, True, False), cl4)
    dp_only = P.estimate(full, P.Layout(1, 1, None, 32, 1, "full", ("core_attn",), False, None, True, True), cl4)
    assert ok.fits and not dp_only.fits


def test_plan_recommends_the_fastest_fitting_layout_and_says_why_others_lose():
    cfg = P.workload_config("7b", 2, "full", global_batch=64)
    cl = P.cluster("a100-40gb", nodes=1)
    res = P.plan(cfg, cl, micro_batches=(1, 2), max_pp=2, vpps=(None,))
    assert res.best is not None and res.best.fits
    assert res.best.step_s <= min(e.step_s for e in res.fitting()) * (1 + P.TIE)
    assert res.best.layout.tp == 2 and res.best.layout.pp == 1                # fastest that fits in 36 GiB
    text = P.format_plan(res)
    assert "RECOMMENDED: TP2 PP1" in text and "why not" in text
    for reason in ("pipeline bubble", "TP communication", "recompute", "out of memory"):
        assert reason in text, reason
    dp_only = next(e for e in res.estimates if (e.layout.tp, e.layout.pp) == (1, 1))
    assert not dp_only.fits and dp_only.memory_gib > 40                      # 7B x 18 bytes / dp is too much
    cfg = C.load_config(TINY, ["train.global_batch_size=16", "train.precision=bf16"])
    # a GPU too small for anything: nothing fits, and the closest layouts say by how much
    tiny_gpu = P.cluster("a100-40gb", nodes=1, gpus_per_node=4, memory_gib=2.1)  # nothing usable after the reserve
    none = P.plan(cfg, tiny_gpu, micro_batches=(1,), max_pp=1, vpps=(None,))
    assert none.best is None and "NOTHING FITS" in P.format_plan(none) and "out of memory" in P.format_plan(none)


def test_method_table_at_a_given_layout(capsys, tmp_path):
    """`python -m megallava.plan --model 33b --method full,lora-64,qlora-64 --tp 2 --pp 2 --dp 2`: the paper's
    trainable parameters (LoRA-64: 0.49B) and, per method, the weight / grad / optimizer bytes of every rank equal
    static_memory's at that layout (which tests above check against the trainer's allocations), from meta-device
    builds: a 33B model, 62 GiB in bf16, never exists in memory."""
    import resource
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = tmp_path / "methods.json"
    assert P.main(["--model", "33b", "--method", "full,lora-64,qlora-64", "--tp", "2", "--pp", "2", "--dp", "2",
                   "--json", str(out)]) == 0
    text = capsys.readouterr().out
    with open(out) as f:
        rows = {r["method"]: r for r in json.load(f)["methods"]}
    assert list(rows) == ["full", "lora-64", "qlora-64"]
    layout = P.Layout(2, 2, None, 2, sequence_parallel=True, overlap=True)   # static bytes: any micro-batch/recompute
    for method, row in rows.items():
        assert (row["layout_fields"]["tp"], row["layout_fields"]["pp"], row["layout_fields"]["dp"]) == (2, 2, 2)
        cfg = P.workload_config("33b", 2, method)
        assert len(row["ranks"]) == 4                                        # 2 pipeline ranks x DP ranks 0 and 1
        for rk in row["ranks"]:
            sm = P.static_memory(cfg, layout, rk["pp_rank"], rk["dp_rank"])
            assert (rk["params_bytes"], rk["grads_bytes"], rk["optimizer_bytes"], rk["trainable"]) == \
                (sm.params, sm.grads, sm.optimizer, sm.trainable), (method, rk)
        w = row["most_loaded"]
        assert w["total_bytes"] == max(rk["total_bytes"] for rk in row["ranks"])
        line = next(x for x in text.splitlines() if x.startswith(method + " "))
        gib = [f"{w[k] / P.GIB:{width}.2f}" for k, width in (("params_bytes", 8), ("grads_bytes", 7),
                                                               ("optimizer_bytes", 7), ("total_bytes", 7))]
        assert f"{row['trainable']:,}" in line and " ".join(gib) in line, line
    lora, qlora, full = rows["lora-64"], rows["qlora-64"], rows["full"]
    assert round(lora["trainable"] / 1e9, 2) == 0.49 and lora["trainable"] == qlora["trainable"] == 494_410_240
    assert "494,410,240 (0.494B)" in text
    assert (full["params"], full["trainable"]) == (32_836_898_816, 32_545_989_632)   # the 0.29B ViT is frozen
    # the most loaded GPU (stage 0: ViT + embedding): LoRA keeps the bf16 base and 16 bytes per trained parameter
    # shard; QLoRA the same but an NF4 base; full fine-tuning 18 bytes per parameter / dp for the fp32 states
    assert (lora["most_loaded"]["params_bytes"], lora["most_loaded"]["grads_bytes"],
            lora["most_loaded"]["optimizer_bytes"]) == (16_902_299_136, 680_145_920, 1_020_219_380)
    assert qlora["most_loaded"]["params_bytes"] == 4_993_309_536 and 0.51 < qlora["nf4_bytes_per_param"] < 0.52
    assert (full["most_loaded"]["grads_bytes"], full["most_loaded"]["optimizer_bytes"]) == (32_553_604_096,
                                                                                            48_830_406_876)
    assert "= 0.516 bytes/parameter" in text
    assert not full["fits"] and lora["fits"] and qlora["fits"]          # full FT of 33B needs more than one node
    # nothing was allocated: the meta builds ran in a forked child (this session's fresh cache), neither process
    # came near the 62 GiB of real bf16 weights
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 2 ** 20        # KiB: < 1 GiB
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 6 * 2 ** 20     # KiB: < 6 GiB
    with pytest.raises(SystemExit, match="does not divide the global batch 64"):
        P.main(["--model", "33b", "--method", "lora-64", "--tp", "2", "--dp", "4", "--micro-batch", "32"])


def test_paper_configs_are_valid_and_state_their_layout(tmp_path):
    files = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "paper", "*.yaml")))
    assert len(files) == len(P.paper_grid()) == 90
    for path in files:
        with open(path) as f:
            header = f.read()
        assert "Planner's layout: TP" in header and "PLACEHOLDERS" in header, path
        # the SLURM launch: this file and the planned node count, nothing else: the file resumes its own
        # checkpoints (load auto, what train.sbatch passes too) and starts from checkpoint.pretrained
        sbatch = next(line for line in header.splitlines() if "sbatch --nodes=" in line).split()
        nodes = int(sbatch[2].split("=")[1])
        assert sbatch[3:] == ["examples/slurm/train.sbatch", os.path.relpath(path, ROOT)], sbatch
        assert int(header.split("torchrun --nnodes ")[1].split()[0]) == nodes
        raw = C.load_config(path)
        assert raw.checkpoint.load == "auto" and not raw.checkpoint.finetune, path
        assert raw.checkpoint.pretrained.startswith("checkpoints/") and "checkpoint.pretrained" in header, path
        assert ("stage1" in raw.checkpoint.pretrained) == ("stage2" in path), path   # stage 2 starts from stage 1
        job = ["data.source=synthetic", f"checkpoint.dir={tmp_path}/job/ckpt", "checkpoint.load=auto"]  # train.sbatch
        cfg = C.load_config(path, job + [f"checkpoint.pretrained={tmp_path}"])   # the placeholder filled in
        C.validate(cfg, nodes * 8)
        with pytest.raises(C.ConfigError, match=f"checkpoint.pretrained={raw.checkpoint.pretrained} does not exist"):
            C.validate(C.load_config(path, job), nodes * 8)   # the placeholder left in: named at once
        assert cfg.train.precision == "bf16"
        if "stage1" in path:
            assert not cfg.model.train_llm and cfg.train.lr == 1e-4
        elif "-full" in path:
            assert cfg.train.lr == 2e-5 and cfg.train.global_batch_size == 512
        else:
            assert cfg.train.lr == 1e-4 and cfg.train.global_batch_size == 64 and cfg.lora.rank in (8, 64)
            assert cfg.lora.quantize == ("qlora" in path)
