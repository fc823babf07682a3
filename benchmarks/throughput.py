"""Training throughput against the env's raw step rate, measured side by side in one run.

1. Raw rate: one core steps `gymnasium.make(env_id)` with random actions for --raw-seconds
   (resetting at episode ends): steps/s of the env alone.
2. Training rate: the training script runs --generations generations through its own command line
   (its workers, policy, logging and checkpoints included; evaluation only at the last generation).
   Env steps/s are read off its progress.csv between the end of the first generation and the end
   of the last one without evaluation, so start-up and evaluation are left out.
3. Ratio = training rate / (workers x raw rate): 1.0 would mean the policy, the workers and the
   optimizer cost nothing next to the env.
4. With --ray: each worker count W is also measured on a local Ray cluster of W CPUs (`ray start
   --head --block --num-cpus W` on a free loopback port, stopped afterwards), the run given
   `--ray-address` instead of `--num-workers`; the table then shows the seconds per generation and
   what Ray adds to each.

    python benchmarks/throughput.py --env-id BipedalWalker-v3 --num-workers 2
    python benchmarks/throughput.py --env-id CartPole-v1 --num-workers 1 -- --hidden-sizes 16
    python benchmarks/throughput.py --env-id BipedalWalker-v3 --num-workers 2 --population-size 64 --ray
    python benchmarks/throughput.py --env-id CartPole-v1 --num-workers 1 2 --compare 0dad489

5. With --compare REV: the script as it is at git revision REV runs too, right after the working tree's
   at each worker count (old and new side by side in one run, on the same machine state).

Arguments after `--` go to the training script unchanged.
"""

import argparse
import csv
import os
import socket
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


def training_step_rate(script_path, env_id, placement, population_size, generations, extra):
    """(env steps/s, seconds per generation, generations measured) of a training run, from its
    progress.csv. placement: the flags that say where it runs (--num-workers W or --ray-address A)."""
    with tempfile.TemporaryDirectory() as logs:
        command = [sys.executable, script_path, "--env-id", env_id, *placement,
                   "--population-size", str(population_size), "--max-iter", str(generations),
                   "--eval-every", str(10 ** 6), "--num-eval-rollouts", "1", "--logs-dir", logs,
                   "--run-name", "bench", "--quiet", *extra]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"training run failed: {(out.stderr.strip().splitlines() or [out.returncode])[-1]}")
        with open(os.path.join(logs, "bench", "progress.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    first, last = rows[0], rows[-2]  # the last row includes the final evaluation
    steps = int(last["env_steps"]) - int(first["env_steps"])
    seconds = float(last["wall_time_s"]) - float(first["wall_time_s"])
    return steps / seconds, seconds / (len(rows) - 2), len(rows) - 2


class LocalRayCluster:
    """`ray start --head --block --num-cpus N` on a free loopback port; stop() ends it (and only it)."""

    def __init__(self, num_cpus):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--num-cpus={num_cpus}",
             f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the local Ray cluster did not start (is Ray installed? "
                             "pip install -r requirements-ray.txt)")
                time.sleep(0.2)

    def stop(self):
        self.process.terminate()
        self.process.wait(60)


def script_versions(script, revisions, folder):
    """[(label, path)] of `script` in the working tree, then as it is at each git revision (written to folder)."""
    versions = [("working tree", os.path.join(ROOT, script))]
    for rev in revisions:
        path = os.path.join(folder, f"{rev}_{script}")
        with open(path, "wb") as f:
            f.write(subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{script}"], check=True,
                                   capture_output=True).stdout)
        versions.append((rev, path))
    return versions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--script", default="train_openai_es.py", help="training script in the repository root")
    parser.add_argument("--env-id", default="BipedalWalker-v3")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--population-size", type=int, default=32)
    parser.add_argument("--generations", type=int, default=6, help="generations per training run (>= 3)")
    parser.add_argument("--raw-seconds", type=float, default=10.0, help="duration of the raw-rate measurement")
    parser.add_argument("--ray", action="store_true",
                        help="also run each worker count on a local Ray cluster of that many CPUs")
    parser.add_argument("--compare", nargs="+", default=[], metavar="REV",
                        help="also measure the script as it is at these git revisions, side by side")
    parser.add_argument("extra", nargs="*", help="arguments for the training script (after --)")
    args = parser.parse_args()
    if args.generations < 3:
        parser.error("--generations must be at least 3")
    old_versions = tempfile.TemporaryDirectory()
    versions = script_versions(args.script, args.compare, old_versions.name)
    raw = raw_step_rate(args.env_id, args.raw_seconds)
    print(f"{args.env_id}: raw env rate on one core {raw:,.0f} steps/s (random actions, {args.raw_seconds:g} s)")
    print(f"{'script':<20} {'version':>12} {'pool':>5} {'workers':>7} {'population':>10} {'gens':>5} "
          f"{'train steps/s':>14} {'workers x raw':>14} {'ratio':>6} {'s/generation':>12} {'Ray adds':>9}")
    for workers in args.num_workers:
        runs = [(version, "local", ["--num-workers", str(workers)], None) for version in versions]
        if args.ray:
            cluster = LocalRayCluster(workers)
            runs.append((versions[0], "ray", ["--ray-address", cluster.address], cluster))
        local_seconds = None
        for (version, path), pool, placement, cluster in runs:
            try:
                rate, seconds, measured = training_step_rate(path, args.env_id, placement, args.population_size,
                                                             args.generations, args.extra)
            finally:
                if cluster:
                    cluster.stop()
            local_seconds = local_seconds or seconds
            added = f"{seconds - local_seconds:+8.3f}s" if pool == "ray" else ""
            print(f"{args.script:<20} {version:>12} {pool:>5} {workers:>7d} {args.population_size:>10d} {measured:>5d} "
                  f"{rate:>14,.0f} {workers * raw:>14,.0f} {rate / (workers * raw):>6.3f} {seconds:>12.3f} {added:>9}")


if __name__ == "__main__":
    main()
