"""Training throughput against the env's raw step rate, measured side by side in one run.

1. Raw rate: one core steps `gymnasium.make(env_id)` with random actions for --raw-seconds
   (resetting at episode ends): steps/s of the env alone.
2. Training rate: the training script runs --generations generations through its own command line
   (its workers, policy, logging and checkpoints included; evaluation only at the last generation).
   Env steps/s are read off its progress.csv between the end of the first generation and the end
   of the last one without evaluation, so start-up and evaluation are left out.
3. Ratio = training rate / (workers x raw rate): 1.0 would mean the policy, the workers and the
   optimizer cost nothing next to the env.

    python benchmarks/throughput.py --env-id BipedalWalker-v3 --num-workers 2
    python benchmarks/throughput.py --env-id CartPole-v1 --num-workers 1 -- --hidden-sizes 16

Arguments after `--` go to the training script unchanged.
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

import gymnasium as gym

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_step_rate(env_id, seconds, seed=0):
    """Env steps per second on this core with random actions: float."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += 1
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def training_step_rate(script, env_id, num_workers, population_size, generations, extra):
    """(env steps/s, generations measured) of a training run, from its progress.csv."""
    with tempfile.TemporaryDirectory() as logs:
        command = [sys.executable, os.path.join(ROOT, script), "--env-id", env_id, "--num-workers", str(num_workers),
                   "--population-size", str(population_size), "--max-iter", str(generations),
                   "--eval-every", str(10 ** 6), "--num-eval-rollouts", "1", "--logs-dir", logs,
                   "--run-name", "bench", "--quiet", *extra]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"training run failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
        with open(os.path.join(logs, "bench", "progress.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    first, last = rows[0], rows[-2]  # the last row includes the final evaluation
    steps = int(last["env_steps"]) - int(first["env_steps"])
    seconds = float(last["wall_time_s"]) - float(first["wall_time_s"])
    return steps / seconds, len(rows) - 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--script", default="train_openai_es.py", help="training script in the repository root")
    parser.add_argument("--env-id", default="BipedalWalker-v3")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--population-size", type=int, default=32)
    parser.add_argument("--generations", type=int, default=6, help="generations per training run (>= 3)")
    parser.add_argument("--raw-seconds", type=float, default=10.0, help="duration of the raw-rate measurement")
    parser.add_argument("extra", nargs="*", help="arguments for the training script (after --)")
    args = parser.parse_args()
    if args.generations < 3:
        parser.error("--generations must be at least 3")
    raw = raw_step_rate(args.env_id, args.raw_seconds)
    print(f"{args.env_id}: raw env rate on one core {raw:,.0f} steps/s (random actions, {args.raw_seconds:g} s)")
    print(f"{'script':<20} {'workers':>7} {'population':>10} {'gens':>5} {'train steps/s':>14} "
          f"{'workers x raw':>14} {'ratio':>6}")
    for workers in args.num_workers:
        rate, measured = training_step_rate(args.script, args.env_id, workers, args.population_size,
                                            args.generations, args.extra)
        print(f"{args.script:<20} {workers:>7d} {args.population_size:>10d} {measured:>5d} {rate:>14,.0f} "
              f"{workers * raw:>14,.0f} {rate / (workers * raw):>6.3f}")


if __name__ == "__main__":
    main()
