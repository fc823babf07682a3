"""Generations to the goal of train_ga.py, for several settings x seeds: how the GA's defaults were chosen.

Each run is `train_ga.py --env-id ENV --seed S --max-iter G --num-workers 1 <setting's flags>` (so a
setting of "" is the script's defaults), several runs at once. A run's score is the first generation
whose evaluation (the best member over --num-eval-rollouts episodes, every --eval-every generations)
reaches the goal; "-" when none did within G generations. Example, the measurement in the README:

    python benchmarks/ga_defaults.py --env-id CartPole-v1 --goal 500 --generations 60 --seeds 1-10 \\
        --setting defaults="" --setting old="--hidden-sizes 20 12 12 --mutation-rate 0.1 --mutation-scale 0.5"
"""

import argparse
import concurrent.futures
import csv
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seeds(text):
    """'1-10' or '1,3,5' -> list of ints."""
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def run_one(env_id, seed, generations, flags, goal, logs_dir, name):
    """One training run; returns (generation of the first evaluation >= goal or None, best evaluation)."""
    command = [sys.executable, os.path.join(ROOT, "train_ga.py"), "--env-id", env_id, "--seed", str(seed),
               "--max-iter", str(generations), "--num-workers", "1", "--logs-dir", logs_dir, "--run-name", name,
               "--quiet", *shlex.split(flags)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    with open(os.path.join(logs_dir, name, "progress.csv"), newline="") as f:
        evaluations = [(int(r["iteration"]), float(r["eval_return_mean"]))
                       for r in csv.DictReader(f) if r["eval_return_mean"]]
    reached = [it for it, value in evaluations if value >= goal]
    return (reached[0] if reached else None), max(value for _, value in evaluations)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="CartPole-v1")
    p.add_argument("--goal", type=float, default=500.0, help="evaluation mean that counts as solved")
    p.add_argument("--generations", type=int, default=60)
    p.add_argument("--seeds", type=seeds, default=seeds("1-10"), help="e.g. 1-10 or 1,2,3")
    p.add_argument("--setting", action="append", required=True, metavar='NAME="FLAGS"',
                   help="a named set of train_ga.py flags; repeat for several")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="runs at once")
    args = p.parse_args()
    settings = [s.split("=", 1) for s in args.setting]
    with tempfile.TemporaryDirectory() as logs_dir, concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {(name, seed): pool.submit(run_one, args.env_id, seed, args.generations, flags, args.goal,
                                             logs_dir, f"{name}_{seed}")
                   for name, flags in settings for seed in args.seeds}
        print(f"{args.env_id}: generation of the first evaluation >= {args.goal:g} (- = not within "
              f"{args.generations}); best evaluation in brackets")
        print("| setting | flags | " + " | ".join(f"seed {s}" for s in args.seeds) + " | solved |")
        print("|---|---|" + "---|" * (len(args.seeds) + 1))
        for name, flags in settings:
            results = [futures[name, seed].result() for seed in args.seeds]
            cells = [f"{g if g is not None else '-'} ({best:.0f})" for g, best in results]
            solved = sum(g is not None for g, _ in results)
            print(f"| {name} | `{flags or '(defaults)'}` | " + " | ".join(cells) + f" | {solved}/{len(results)} |",
                  flush=True)


if __name__ == "__main__":
    main()
