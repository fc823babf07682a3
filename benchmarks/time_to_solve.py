"""Time to solve, the user's figure: process start to the end of a run that stops at its first evaluation
over --num-eval-rollouts episodes whose mean reaches --reward-goal, for several seeds, side by side with
the script as it is at older git revisions (interleaved seed by seed, on the same machine state), with
the same flags or, given --compare-flags, with the command those revisions shipped.

    python benchmarks/time_to_solve.py --seeds 1 2 3 --compare 0dad489 -- \
        --env-id LunarLander-v3 --hidden-sizes 32 32 --population-size 64 --sigma 0.1 --learning-rate 0.03 \
        --eval-every 25 --reward-goal 200
    python benchmarks/time_to_solve.py --seeds 1 2 3 --compare 5278065 \
        --compare-flags "--env-id LunarLander-v3 --hidden-sizes 32 32 --population-size 64 --sigma 0.1 \
        --learning-rate 0.03 --eval-every 25 --reward-goal 200" -- --env-id LunarLander-v3 --hidden-sizes 32 32 \
        --population-size 32 --sigma 0.1 --learning-rate 0.04 --eval-every 1000 --reward-goal 200
    python benchmarks/time_to_solve.py --script train_ga.py --seeds 1 2 3 -- --env-id LunarLander-v3 --reward-goal 200

Arguments after `--` go to the training script (with `--num-eval-rollouts 100` unless given), and to the
--compare revisions too unless --compare-flags gives theirs. A run that ends without reaching the goal
(its --max-iter) is reported as such.
"""

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from throughput import script_versions


def solve(script_path, flags, seed):
    """(seconds from process start to exit, generations, solved: bool) of one run."""
    with tempfile.TemporaryDirectory() as logs:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, script_path, *flags, "--seed", str(seed), "--logs-dir", logs,
                              "--run-name", "solve", "--quiet"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(f"run failed: {(out.stderr.strip().splitlines() or [out.returncode])[-1]}")
        with open(os.path.join(logs, "solve", "progress.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    return seconds, int(rows[-1]["iteration"]), "reward goal" in out.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", default="train_openai_es.py", help="training script in the repository root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--compare", nargs="+", default=[], metavar="REV",
                        help="also time the script as it is at these git revisions")
    parser.add_argument("--compare-flags", metavar="FLAGS", help="the --compare revisions' flags, quoted as one "
                        "argument (default: the working tree's, after --)")
    parser.add_argument("flags", nargs="*", help="the training script's flags (after --)")
    args = parser.parse_args()

    def with_eval_rollouts(flags):
        return flags + ([] if "--num-eval-rollouts" in flags else ["--num-eval-rollouts", "100"])
    flags = with_eval_rollouts(args.flags)
    compare_flags = flags if args.compare_flags is None else with_eval_rollouts(shlex.split(args.compare_flags))
    old_versions = tempfile.TemporaryDirectory()
    versions = script_versions(args.script, args.compare, old_versions.name)
    print(f"{args.script} {' '.join(flags)}")
    if args.compare and compare_flags != flags:
        print(f"{' '.join(args.compare)}: {args.script} {' '.join(compare_flags)}")
    times = {version: [] for version, _ in versions}
    for seed in args.seeds:
        for version, path in versions:
            seconds, generations, solved = solve(path, compare_flags if version in args.compare else flags, seed)
            times[version].append(seconds)
            print(f"{version:>12} seed {seed}: {seconds:7.1f} s, {generations} generations"
                  + ("" if solved else ", goal NOT reached"), flush=True)
    for version, _ in versions:
        print(f"{version:>12} median {statistics.median(times[version]):7.1f} s")


if __name__ == "__main__":
    main()
