#!/usr/bin/env python
"""Run a grid of layouts with the trainer and report on them (the inputs of tools/throughput_report.py).

    # every layout of the grid at 1, 2 and 4 GPUs on this node, then the report
    python tools/sweep.py --config examples/configs/tiny_cpu.yaml --out runs/sweep --gpus 1,2,4 \\
        --grid tp=1,2 pp=1,2,4 mb=2 --set train.iters=20 --report
    # the same grid as SLURM array lists (one per node count) for examples/slurm/sweep_array.sbatch
    python tools/sweep.py --config run.yaml --out runs/sweep --gpus 8,16,32 --grid tp=2,4,8 pp=1,2,4 --emit-slurm

Grid keys: tp pp vpp mb gb recompute sp, or any dotted config key (e.g. train.recompute_modules=[core_attn]).
Layouts the trainer would reject at a world size (config.validate) are skipped and listed. A run whose launch.json
says it finished is not run again (--force reruns it).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megallava import report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base YAML config")
    p.add_argument("--out", required=True, help="directory of the run directories (one per layout)")
    p.add_argument("--grid", nargs="+", default=["tp=1"], help="key=v1,v2 ... (see above)")
    p.add_argument("--gpus", default="1", help="world sizes, comma-separated")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--set", nargs="*", default=[], help="overrides for every run, e.g. train.iters=20")
    p.add_argument("--launcher", default="torchrun", choices=("torchrun", "fork", "print"))
    p.add_argument("--emit-slurm", action="store_true", help="write layouts_<N>nodes.txt for sweep_array.sbatch")
    p.add_argument("--force", action="store_true", help="rerun layouts that finished already")
    p.add_argument("--report", action="store_true", help="write the throughput report to OUT/report")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    args = p.parse_args(argv)
    gpus = [int(x) for x in args.gpus.split(",")]
    points, rejected = report.sweep_points(args.config, report.parse_grid(args.grid), gpus, args.set,
                                           args.gpus_per_node)
    for world, ov, problems in rejected:
        print(f"skipped at {world} GPUs: {' '.join(ov)}: {problems[0]}")
    print(f"{len(points)} runs")
    if args.emit_slurm:
        for nodes, path in report.write_slurm_lists(args.config, points, args.out).items():
            n = sum(1 for _ in open(path))
            print(f"sbatch --nodes={nodes} --array=0-{n - 1} examples/slurm/sweep_array.sbatch {args.config} {path} "
                  f"{args.out}")
        return 0
    done = report.run_sweep(args.config, points, args.out, args.launcher, args.force, args.timeout)
    if args.report and done:
        report.write_report(done, os.path.join(args.out, "report"))
        print(f"report: {os.path.join(args.out, 'report', 'report.md')}")
    return 0 if args.launcher == "print" or len(done) == len(points) else 1


if __name__ == "__main__":
    sys.exit(main())
