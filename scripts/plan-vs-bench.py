#!/usr/bin/env python3
"""Checks `shardtrain plan` against `shardtrain bench` on this machine: for each world size and
strategy the bench measured, the measured step time and communication beside the plan's
prediction, and the ratio of each strategy to no_shard at the same world size (the planner's
claim that matters: which strategy is faster, by how much).

    scripts/plan-vs-bench.py BENCH_JSON --intra-bw GB/S [--peak-tflops X] [--binary PATH]

BENCH_JSON comes from `shardtrain bench --config C --world 1,2,4 --json`; the plan is made for
the same config, calibrated by that file, with every rank inside one node whose ring runs at
--intra-bw (measure it with `shardtrain bench comm`). Ranks of a CPU bench are threads sharing
the cores and cannot overlap communication, so the plan's *total* communication is the figure
to compare there (the bench's comm_exposed + comm_overlapped), and compute does not shrink with
the world size as it would on separate GPUs: compare strategies at one world size, not across.
"""

import argparse
import json
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_json")
    ap.add_argument("--intra-bw", required=True, type=float)
    ap.add_argument("--peak-tflops", default="1")
    ap.add_argument("--memory-gib", default="24")
    ap.add_argument("--binary", default="target/release/shardtrain")
    args = ap.parse_args()

    bench = json.load(open(args.bench_json))
    worlds = sorted({r["world_size"] for r in bench["rows"]})
    plan_cmd = [
        args.binary, "plan", "--config", bench["config"],
        "--gpus", ",".join(str(w) for w in worlds),
        "--gpus-per-node", str(max(worlds)),
        "--gpu", "custom", "--memory-gib", args.memory_gib, "--peak-tflops", args.peak_tflops,
        "--intra-bw", str(args.intra_bw), "--calibrate", args.bench_json, "--json",
    ]
    plan = json.loads(subprocess.run(plan_cmd, check=True, capture_output=True, text=True).stdout)
    predicted = {}
    for section in plan["sections"]:
        for row in section["rows"]:
            if row.get("status") == "planned":
                t = row["time"]
                predicted[(section["gpus"], row["strategy"])] = (
                    t["compute_s"] * 1e3, t["comm_s"] * 1e3, t["step_s"] * 1e3)

    print(f"bench: {bench['card']} ({bench['device']}), {bench['config']}; "
          f"plan: {' '.join(plan_cmd[1:])}")
    print(f"{'world':>5} {'strategy':<14} {'step ms':>8} {'comm ms':>8} | "
          f"{'plan comm':>9} {'plan step*':>10} | {'step/no_shard':>13} {'plan':>6} | "
          f"{'comm/no_shard':>13} {'plan':>6}")
    for w in worlds:
        rows = {r["strategy"]: r for r in bench["rows"] if r["world_size"] == w}
        base = rows.get("no_shard")
        for strategy, r in rows.items():
            key = (w, strategy)
            if key not in predicted:
                continue
            compute, comm, _ = predicted[key]
            measured_comm = r["phases_ms"]["comm_exposed"] + r["phases_ms"]["comm_overlapped"]
            step = r["ms_per_step"]["median"]
            # No overlap on the CPU: the plan's step there is compute + all of its communication.
            plan_step = compute + comm
            cells = [f"{w:>5} {strategy:<14} {step:>8.1f} {measured_comm:>8.1f} | "
                     f"{comm:>9.1f} {plan_step:>10.1f} |"]
            if base is not None and (w, "no_shard") in predicted and w > 1:
                b_compute, b_comm, _ = predicted[(w, "no_shard")]
                b_measured_comm = (base["phases_ms"]["comm_exposed"]
                                   + base["phases_ms"]["comm_overlapped"])
                cells.append(f" {step / base['ms_per_step']['median']:>13.2f} "
                             f"{plan_step / (b_compute + b_comm):>6.2f} |"
                             f" {measured_comm / b_measured_comm:>13.2f} {comm / b_comm:>6.2f}")
            print("".join(cells))
    print("* compute + all communication (no overlap on the CPU); the plan's compute is the "
          "calibrated rate over this world's tokens per rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
