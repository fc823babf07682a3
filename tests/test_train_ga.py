"""Tests of train_ga.py: operators and invariants in-process, whole runs through subprocess."""

import csv
import glob
import importlib.util
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import train_ga as ga_mod
from conftest import modules_imported_by_help, run_as_on_macos, run_main, run_on_terminal, run_without_ray, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_ga.py")
TINY = ["--population-size", "6", "--elite-size", "2", "--max-episode-steps", "50", "--num-eval-rollouts", "2"]


def run_script(args, cwd, timeout=300, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_here(args, cwd):
    """run_script's result from main() in this process: no seconds of imports."""
    return run_main(ga_mod, args, cwd)


def train(tmp_path, name, *extra, env="CartPole-v1", workers=1, iters=2):
    architecture = [] if "--init-from" in extra else ["--hidden-sizes", "8"]  # an init file brings its own
    env_flags = [] if "--multitask" in extra else ["--env-id", env]
    args = [*env_flags, "--run-name", name, "--num-workers", str(workers), "--max-iter", str(iters), *TINY,
            *architecture, *extra]
    if workers == 1:  # in this process: no seconds of imports
        out = run_main(ga_mod, args, tmp_path)
    else:
        out = run_script(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    return tmp_path / "runs" / name


# Where a run ran (wall clock, CPUs) is not part of its result.
def progress(run_dir, drop=("wall_time_s", "num_cpus")):
    with open(run_dir / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def assert_one_line_error(out):
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert "error" in lines[0]
    return lines[0]


def make_ga(population, **kwargs):
    return ga_mod.GeneticAlgorithm(np.asarray(population, np.float32), **kwargs)


# ------------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------------
def test_blx_alpha_children_lie_in_the_widened_interval_and_cover_it():
    rng = np.random.default_rng(0)
    x = np.array([0.0, 1.0, -2.0, 5.0, 3.0], np.float32)
    y = np.array([1.0, 1.0, 2.0, -1.0, 3.5], np.float32)
    alpha = 0.5
    low, high = np.minimum(x, y), np.maximum(x, y)
    d = high - low
    lo, hi = low - alpha * d, high + alpha * d
    children = np.stack([c for _ in range(4000) for c in ga_mod.crossover(x, y, rng, "blx-alpha", alpha)])
    assert children.dtype == np.float32
    assert np.all(children >= lo - 1e-6) and np.all(children <= hi + 1e-6)
    varying = d > 0
    span = (hi - lo)[varying]
    # Covered: the extremes come within 1% of both widened bounds, ...
    assert np.all(children[:, varying].min(0) - lo[varying] < 0.01 * span)
    assert np.all(hi[varying] - children[:, varying].max(0) < 0.01 * span)
    # ... and uniformly: the parts outside [min, max] hold alpha d / ((1 + 2 alpha) d) = 1/4 each.
    outside_low = (children[:, varying] < low[varying]).mean(0)
    outside_high = (children[:, varying] > high[varying]).mean(0)
    assert np.allclose(outside_low, 0.25, atol=0.03) and np.allclose(outside_high, 0.25, atol=0.03)
    assert np.all(children[:, 1] == 1.0)  # equal genes: d = 0, the child keeps the value
    # alpha = 0: the children stay between the parents.
    zero = np.stack([c for _ in range(200) for c in ga_mod.crossover(x, y, rng, "blx-alpha", 0.0)])
    assert np.all(zero >= low - 1e-6) and np.all(zero <= high + 1e-6)


def test_one_point_and_uniform_crossover_only_swap_genes():
    rng = np.random.default_rng(1)
    x, y = np.zeros(10, np.float32), np.ones(10, np.float32)
    for _ in range(50):
        a, b = ga_mod.crossover(x, y, rng, "one-point")
        cut = int(np.argmax(a == 1))
        assert 1 <= cut <= 9 and np.all(a[:cut] == 0) and np.all(a[cut:] == 1)
        assert np.array_equal(a + b, np.ones(10))
    a, b = ga_mod.crossover(np.arange(1000, dtype=np.float32), -np.arange(1000, dtype=np.float32), rng, "uniform")
    assert np.array_equal(np.abs(a), np.arange(1000)) and np.array_equal(a, -b)
    assert 0.4 < (a < 0).mean() < 0.6


def test_ranking_probabilities_monotone_and_sum_to_one():
    rng = np.random.default_rng(2)
    fitness = rng.normal(size=50) * 100 - 30
    for pressure in (1.0, 1.5, 2.0):
        p = ga_mod.selection_probabilities(fitness, "ranking", pressure)
        assert p.sum() == pytest.approx(1.0) and np.all(p >= 0)
        order = np.argsort(fitness)
        assert np.all(np.diff(p[order]) >= -1e-15)  # fitter -> at least as likely
        assert p.max() == pytest.approx(pressure / 50) and p.min() == pytest.approx((2 - pressure) / 50)
    assert np.allclose(ga_mod.selection_probabilities(fitness, "ranking", 1.0), 1 / 50)
    tied = ga_mod.selection_probabilities([3.0, 1.0, 3.0, 2.0], "ranking", 2.0)
    assert tied[0] == tied[2] and tied.sum() == pytest.approx(1.0) and tied[1] < tied[3] < tied[0]
    # Only the order matters, not the scale.
    assert np.allclose(ga_mod.selection_probabilities(fitness ** 3, "ranking"), ga_mod.selection_probabilities(fitness, "ranking"))


def test_roulette_works_with_negative_fitness():
    fitness = np.array([-120.0, -100.0, -20.0, -60.0])
    p = ga_mod.selection_probabilities(fitness, "roulette")
    assert p.sum() == pytest.approx(1.0) and np.all(p >= 0)
    assert np.allclose(p, (fitness + 120) / (fitness + 120).sum())
    assert np.argmax(p) == 2 and p[0] == 0
    assert np.allclose(ga_mod.selection_probabilities(np.full(4, -7.0), "roulette"), 0.25)  # all equal: uniform
    rng = np.random.default_rng(3)
    counts = np.bincount(ga_mod.select_parents(fitness, 20000, rng, "roulette"), minlength=4)
    assert np.allclose(counts / 20000, p, atol=0.02)


def test_tournament_selection():
    rng = np.random.default_rng(4)
    fitness = np.array([5.0, -1.0, 9.0, 0.0])
    assert np.all(ga_mod.select_parents(fitness, 100, rng, "tournament", tournament_size=40) == 2)
    counts = np.bincount(ga_mod.select_parents(fitness, 8000, rng, "tournament", tournament_size=1), minlength=4)
    assert np.allclose(counts / 8000, 0.25, atol=0.03)  # size 1: uniform
    counts = np.bincount(ga_mod.select_parents(fitness, 8000, rng, "tournament", tournament_size=2), minlength=4)
    assert counts[2] > counts[0] > counts[3] > counts[1]


@pytest.mark.parametrize("method", ["gaussian", "uniform"])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_mutation_rate_is_what_it_says(method, rate):
    rng = np.random.default_rng(5)
    n = 200_000
    x = np.zeros(n, np.float32)
    y = ga_mod.mutate(x, rng, rate=rate, scale=0.3, method=method)
    changed = y != 0
    assert abs(changed.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / n) + 1e-12  # within 5 binomial sigmas
    if rate:
        if method == "gaussian":
            assert y[changed].std() == pytest.approx(0.3, rel=0.05) and abs(y[changed].mean()) < 0.01
        else:
            assert np.all(np.abs(y) <= 0.3) and y[changed].std() == pytest.approx(0.3 / np.sqrt(3), rel=0.05)
    assert y.dtype == np.float32 and np.all(x == 0)  # a new array


def test_parents_vs_children_keeps_parents_when_children_are_worse():
    population = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    ga = make_ga(population, replacement="parents-vs-children", mutation_rate=1.0, seed=0)
    ga.ask()
    parent_fitness = np.arange(8.0)
    ga.tell(parent_fitness)
    children = ga.ask()
    parents = ga.pending[1]
    assert not any(np.array_equal(c, p) for c in children for p in population)  # all mutated
    # Children of pair 0 are better than their parents, the other pairs' children are worse.
    fitness = np.full(8, -100.0)
    fitness[0:2] = parent_fitness[parents[0]].sum() / 2 + 1
    ga.tell(fitness)
    assert np.array_equal(ga.population[0:2], children[0:2]) and np.all(ga.fitness[0:2] == fitness[0:2])
    for k in range(1, 4):
        assert np.array_equal(ga.population[2 * k:2 * k + 2], population[parents[k]])
        assert np.array_equal(ga.fitness[2 * k:2 * k + 2], parent_fitness[parents[k]])
    assert ga.children_accepted == 2
    # A tie keeps the parents: the children must beat them.
    ga.ask()
    parents = ga.pending[1]
    kept_population, kept_fitness = ga.population.copy(), ga.fitness.copy()
    ga.tell(kept_fitness[parents.ravel()][::-1].reshape(4, 2)[::-1].ravel())  # same sums per pair
    assert np.array_equal(ga.population, kept_population[parents.ravel()]) and ga.children_accepted == 0


def test_elites_survive_and_are_re_evaluated():
    rng = np.random.default_rng(6)
    population = rng.normal(size=(10, 4)).astype(np.float32)
    ga = make_ga(population, replacement="generational", elite_size=3, mutation_rate=1.0, seed=1)
    ga.ask()
    fitness = np.array([3.0, 9.0, 1.0, 7.0, 0.0, 8.0, 2.0, 4.0, 5.0, 6.0])
    ga.tell(fitness)
    candidates = ga.ask()
    assert candidates.shape == (10, 4)
    assert np.array_equal(candidates[:3], population[[1, 5, 3]])  # the three best, unchanged, first
    assert not any(np.array_equal(c, p) for c in candidates[3:] for p in population)
    # Their fitness is the new (fresh-episode) one, not the old: a lucky elite drops out.
    new_fitness = np.array([-50.0, 4.0, 4.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    ga.tell(new_fitness)
    assert np.array_equal(ga.population[:3], population[[1, 5, 3]])
    assert np.array_equal(ga.fitness, new_fitness)
    assert np.array_equal(ga.best()[0], population[3]) and ga.best()[1] == 4.5
    assert not any(np.array_equal(c, population[1]) for c in ga.ask()[:3])  # the unlucky elite is gone


def test_ga_is_deterministic_and_round_trips_through_pickle():
    population = np.random.default_rng(7).normal(size=(6, 5)).astype(np.float32)
    a, b = make_ga(population, seed=3), make_ga(population, seed=3)
    for ga in (a, b):
        ga.ask()
        ga.tell(np.arange(6.0))
    assert np.array_equal(a.ask(), b.ask())
    a.tell(np.arange(6.0)[::-1])
    clone = ga_mod.GeneticAlgorithm.from_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    assert np.array_equal(a.ask(), clone.ask())
    other = make_ga(population, seed=4)
    other.ask()
    other.tell(np.arange(6.0))
    b.tell(np.arange(6.0)[::-1])
    assert not np.array_equal(b.ask(), other.ask())


def test_ga_evolves_towards_a_target():
    target = np.linspace(-1, 1, 8).astype(np.float32)
    rng = np.random.default_rng(8)
    for replacement in ("generational", "parents-vs-children"):
        ga = make_ga(rng.normal(size=(32, 8)), replacement=replacement, mutation_scale=0.1, seed=0)
        for _ in range(60):
            candidates = ga.ask()
            ga.tell(-np.square(candidates - target).sum(1))
        start = np.square(rng.normal(size=(32, 8)) - target).sum(1).min()
        assert -ga.best()[1] < 0.1 * start, replacement


# ------------------------------------------------------------------------------------------------
# Policies and envs
# ------------------------------------------------------------------------------------------------
def test_flat_vector_round_trip_and_original_walker_size():
    policy = ga_mod.Policy(obs_shape=(24,), num_actions=4, discrete=False, hidden_sizes=(20, 12, 12))  # the original's
    theta = parameters_to_vector(policy.parameters())
    assert theta.numel() == 24 * 20 + 20 + 20 * 12 + 12 + 12 * 12 + 12 + 12 * 4 + 4
    new = torch.randn_like(theta)
    vector_to_parameters(new, policy.parameters())
    assert torch.equal(parameters_to_vector(policy.parameters()), new)
    assert torch.equal(policy.layers[0].weight.flatten(), new[:480])  # weights then bias, layer by layer
    policy.load(new.numpy())  # act() reads numpy views of the weights, which load() renews
    action = policy.act(np.ones(24, np.float32))
    assert action.shape == (4,) and np.all(np.abs(action) <= 1)
    batch = policy(torch.ones(5, 24))  # the distillation path: same outputs in a batch
    assert batch.shape == (5, 4) and torch.allclose(batch[0], torch.from_numpy(action), atol=1e-6)
    discrete = ga_mod.Policy(obs_shape=(4,), num_actions=2, discrete=True, hidden_sizes=(8,))
    assert isinstance(discrete.act(np.ones(4, np.float32)), int)


def test_multitask_policy_shares_its_trunk():
    tasks = [{"obs_shape": [4], "discrete": True, "num_actions": 2},
             {"obs_shape": [24], "discrete": False, "num_actions": 4}]
    policy = ga_mod.MultitaskPolicy(tasks, hidden_sizes=(8, 6), activation="tanh")
    assert [m.in_features for m in policy.inputs] == [4, 24]
    assert policy.trunk[0].in_features == 16 and [h.out_features for h in policy.heads] == [2, 4]
    torch.manual_seed(0)
    vector_to_parameters(torch.randn(ga_mod.num_params(policy)), policy.parameters())
    a, b = np.ones(4, np.float32), np.ones(24, np.float32)
    discrete_action, box_action = policy.act([a, b])
    assert isinstance(discrete_action, int) and box_action.shape == (4,) and np.all(np.abs(box_action) <= 1)
    # Task 1's action depends on task 0's input: that is what the noise study probes.
    assert not np.allclose(policy.act([a * -3, b])[1], box_action)


def test_multitask_rollout_noise_changes_only_what_it_should():
    configs = ga_mod.env_configs_from_args(ga_mod.parse_args(["--multitask", "CartPole-v1", "LunarLander-v3",
                                                              "--max-episode-steps", "40"])[0])
    policy_config = ga_mod.policy_config_from_envs(configs, [8, 8], "tanh")
    torch.manual_seed(1)
    policy = ga_mod.build_policy(policy_config)
    envs = [ga_mod.make_env(c, training=False) for c in configs]
    real = ga_mod.multitask_rollout(envs, policy, 5)
    assert real == ga_mod.multitask_rollout([ga_mod.make_env(c, training=False) for c in configs], policy, 5)
    noisy = ga_mod.multitask_rollout([ga_mod.make_env(c, training=False) for c in configs], policy, 5, noisy=(0,))
    assert len(real[0]) == 2 and real != noisy and real[1] <= 80


def test_multitask_needs_vector_envs_and_two_layers(tmp_path):
    assert "--hidden-sizes" in assert_one_line_error(
        run_script(["--multitask", "CartPole-v1", "LunarLander-v3", "--hidden-sizes", "8"], cwd=tmp_path))
    assert "images" in assert_one_line_error(
        run_script(["--multitask", "CartPole-v1", "CarRacing-v3", "--max-iter", "1"], cwd=tmp_path))


def children(pid):
    """Live (not zombie) child processes of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def pool_setup(rows=8):
    configs = ga_mod.env_configs_from_args(ga_mod.parse_args(["--env-id", "CartPole-v1"])[0])
    policy_config = ga_mod.policy_config_from_envs(configs, [8], "tanh")
    dim = ga_mod.num_params(ga_mod.build_policy(policy_config))
    return (configs, policy_config, dim), [rows * dim]


def test_pool_reads_members_from_shared_memory_and_survives_a_killed_worker(capsys):
    worker_args, sizes = pool_setup()
    members = np.random.default_rng(0).normal(0, 1, (8, worker_args[2])).astype(np.float32)
    tasks = [ga_mod.RolloutTask(i, [100 + i], True) for i in range(8)]
    local = ga_mod.RolloutPool(1, None, ga_mod.RolloutWorker, worker_args, sizes)
    expected = local.map(tasks, [members])
    assert len({r[0][0][0] for r in expected}) > 1  # the members differ, so a mix-up would show
    assert local.map(tasks[:1], [members[3:4]]) == [local.map([ga_mod.RolloutTask(3, [100], True)], [members])[0]]
    pool = ga_mod.RolloutPool(2, None, ga_mod.RolloutWorker, worker_args, sizes)
    try:
        assert pool.map(tasks, [members]) == expected
        capsys.readouterr()
        victim = next(iter(pool.executor._processes.values()))
        os.kill(victim.pid, signal.SIGKILL)  # dead before the map: however fast the rollouts, the map meets it
        assert pool.map(tasks * 60, [members]) == expected * 60
        warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
        assert len(warnings) == 1 and "restarting" in warnings[0]
        assert not victim.is_alive() and all(p.is_alive() for p in pool.executor._processes.values())
    finally:
        pool.close()


def test_an_exception_in_a_worker_is_one_line_not_a_traceback(monkeypatch):
    worker_args, sizes = pool_setup()

    def broken(self, task):
        raise ValueError("the env broke")

    monkeypatch.setattr(ga_mod.RolloutWorker, "run", broken)  # forked workers inherit it
    pool = ga_mod.RolloutPool(2, None, ga_mod.RolloutWorker, worker_args, sizes)
    try:
        with pytest.raises(ga_mod.UserError, match="rollout failed in a worker: ValueError: the env broke"):
            pool.map([ga_mod.RolloutTask(0, [1], True)] * 4, [np.zeros(sizes[0], np.float32)])
    finally:
        pool.close()


def test_workers_that_keep_dying_stop_the_run_with_the_checkpoint_kept(monkeypatch, capsys):
    worker_args, sizes = pool_setup()
    monkeypatch.setattr(ga_mod.RolloutWorker, "run", lambda self, task: os._exit(1))  # forked workers inherit it
    pool = ga_mod.RolloutPool(2, None, ga_mod.RolloutWorker, worker_args, sizes)
    pool.on_lost = lambda: "the checkpoint of generation 7 is kept"
    try:
        with pytest.raises(ga_mod.PoolLost, match="keep dying.*stopped after 3 tries: the checkpoint of generation 7"):
            pool.map([ga_mod.RolloutTask(0, [1], True)] * 4, [np.zeros(sizes[0], np.float32)])
    finally:
        pool.close()
    assert capsys.readouterr().out.count("restarting the workers") == 2


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker processes in /proc")
def test_one_worker_runs_in_this_process_through_the_same_path(monkeypatch):
    # --num-workers 1: no process started, the pool's worker built here once, an error one line as in a worker.
    worker_args, sizes = pool_setup()
    before = set(children(os.getpid()))  # a Ray cluster of the session is one
    pool = ga_mod.RolloutPool(1, None, ga_mod.RolloutWorker, worker_args, sizes)
    try:
        assert isinstance(pool.executor, ga_mod.InProcess)
        worker = ga_mod.WORKERS[pool.key]
        members = np.random.default_rng(0).normal(0, 1, (8, worker_args[2])).astype(np.float32)
        tasks = [ga_mod.RolloutTask(i, [100 + i], True) for i in range(8)]
        assert pool.map(tasks, [members]) == pool.map(tasks, [members]) and ga_mod.WORKERS[pool.key] is worker
        assert worker.members.base is not None  # a view of the pool's shared buffer, not a copy
        assert set(children(os.getpid())) <= before  # no worker process
        monkeypatch.setattr(ga_mod.RolloutWorker, "run", lambda self, tasks: 1 / 0)
        with pytest.raises(ga_mod.UserError, match="rollout failed in a worker: ZeroDivisionError"):
            pool.map(tasks, [members])
    finally:
        pool.close()
    assert pool.key not in ga_mod.WORKERS


def test_the_restart_rule_is_worker_tries_tries_of_a_batch(monkeypatch, capsys, tmp_path):
    # A batch whose worker dies is tried WORKER_TRIES times in all: WORKER_TRIES - 1 restarts, then PoolLost.
    worker_args, sizes = pool_setup()
    tries = tmp_path / "tries"

    def dies(self, tasks):
        with open(tries, "a") as f:
            f.write("x")
        os._exit(1)

    monkeypatch.setattr(ga_mod.RolloutWorker, "run", dies)  # forked workers inherit it
    monkeypatch.setattr(ga_mod, "WORKER_TRIES", 2)
    pool = ga_mod.RolloutPool(2, None, ga_mod.RolloutWorker, worker_args, sizes)
    try:
        with pytest.raises(ga_mod.PoolLost, match="stopped after 2 tries"):
            pool.map([ga_mod.RolloutTask(0, [1], True)], [np.zeros(sizes[0], np.float32)])
    finally:
        pool.close()
    assert capsys.readouterr().out.count("restarting the workers") == 1
    assert tries.read_text() == "xx"  # one chunk, one worker running it per try


@pytest.mark.skipif(importlib.util.find_spec("slimevolleygym") is None, reason="needs slimevolleygym (optional)")
def test_slimevolley_adapter_and_shaped_fitness(tmp_path):
    config = ga_mod.env_configs_from_args(ga_mod.parse_args(["--env-id", "SlimeVolley-v0"])[0])[0]
    env = ga_mod.make_env(config, training=False)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (12,) and obs.dtype == np.float32 and env.action_space.n == 6
    shaped = ga_mod.make_env(dict(config, slime_fitness="shaped"), training=True)
    shaped.reset(seed=3)
    assert shaped.step(0)[1] == pytest.approx(0.01)  # surviving a step
    run = train(tmp_path, "slime", "--slime-fitness", "shaped", env="SlimeVolley-v0", iters=1)
    row = progress(run)[0]
    assert 0 < float(row["return_min"]) <= 0.5 + 1 and float(row["eval_return_mean"]) <= 0  # eval: the score


# ------------------------------------------------------------------------------------------------
# Whole runs
# ------------------------------------------------------------------------------------------------
def test_run_folder_files_and_columns(tmp_path):
    run = train(tmp_path, "cp", "--eval-every", "1")
    for name in ("args.json", "progress.csv", "learning_curve.png", "checkpoint.pkl", "best.npz", "final.npz"):
        assert (run / name).exists(), name
    with open(run / "progress.csv") as f:
        header = f.readline().strip().split(",")
    assert header[:10] == ["iteration", "evaluations", "env_steps", "wall_time_s", "return_min", "return_mean",
                           "return_max", "return_std", "eval_return_mean", "eval_return_std"]
    rows = progress(run)
    assert [int(r["iteration"]) for r in rows] == [1, 2] and [int(r["evaluations"]) for r in rows] == [6, 12]
    assert all(r["eval_return_mean"] for r in rows)
    assert [int(r["children_accepted"]) for r in rows] == [6, 4]  # generational with 2 elites
    assert float(rows[1]["best_fitness"]) <= float(rows[1]["return_max"])
    config = json.loads((run / "args.json").read_text())
    assert config["replacement"] == "generational" and config["versions"]["torch"].startswith("2.13.0")
    assert any(blas.startswith("openblas ") for blas in config["versions"]["blas"])  # its kernels named
    with np.load(run / "final.npz", allow_pickle=False) as data:
        assert data["params"].dtype == np.float32 and data["params"].ndim == 1
        meta, size = json.loads(str(data["meta"])), data["params"].size
    assert meta["script"] == "train_ga.py" and meta["env_id"] == "CartPole-v1"
    assert meta["policy"]["hidden_sizes"] == [8] and size == 4 * 8 + 8 + 8 * 2 + 2
    # the last generation was evaluated: final.npz carries that evaluation (same member, same episodes)
    assert sorted(meta["evaluation"]) == ["episodes", "mean", "std"]
    assert f"{meta['evaluation']['mean']:.6g}" == rows[-1]["eval_return_mean"]


def test_one_and_two_workers_give_the_same_run(tmp_path):
    # BipedalWalker: Box2D, rebuilt per episode; fitness differs per member, so any mix-up shows.
    one = train(tmp_path, "w1", "--eval-every", "2", env="BipedalWalker-v3", workers=1, iters=3)
    two = train(tmp_path, "w2", "--eval-every", "2", env="BipedalWalker-v3", workers=2, iters=3)
    assert progress(one) == progress(two)
    assert len({r["return_mean"] for r in progress(one)}) == 3
    assert np.array_equal(np.load(one / "final.npz")["params"], np.load(two / "final.npz")["params"])


@pytest.mark.parametrize("replacement", ["generational", "parents-vs-children"])
def test_resume_is_exact(tmp_path, replacement):
    extra = ["--eval-every", "2", "--replacement", replacement, "--selection", "tournament"]
    straight = train(tmp_path, "straight", *extra, iters=5)
    # stopped at generation 3, off the evaluation schedule: that run's final evaluation stays out of the record
    split = train(tmp_path, "split", *extra, iters=3)
    assert ga_mod.load_weights(str(split / "final.npz"))[1]["evaluation"]["episodes"] > 0
    out = run_here(["--resume", str(split), "--max-iter", "5", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resuming at generation 3" in out.stdout
    assert progress(straight) == progress(split)
    assert [r["eval_return_mean"] != "" for r in progress(split)] == [False, True, False, True, False]
    assert np.array_equal(np.load(straight / "final.npz")["params"], np.load(split / "final.npz")["params"])


def test_resume_refuses_algorithm_changes_and_drops_late_rows(tmp_path):
    run = train(tmp_path, "r", iters=1)
    line = assert_one_line_error(run_here(["--resume", str(run), "--mutation-rate", "0.5"], cwd=tmp_path))
    assert "--mutation-rate" in line
    reference = progress(run)
    with open(run / "progress.csv", "a") as f:  # as if killed between the CSV row and the checkpoint
        f.write("2,99,1,1,1,1,1,1,,,1,1,1,1,1\r\n")
    out = run_here(["--resume", str(run), "--max-iter", "2", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = progress(run)
    assert rows[:1] == reference and len(rows) == 2 and rows[1]["evaluations"] == "12"


def test_a_checkpoint_written_before_exp_name_and_track_existed_resumes(tmp_path):
    run = train(tmp_path, "old", iters=1)
    with open(run / "checkpoint.pkl", "rb") as f:
        state = pickle.load(f)  # our own file: the plain unpickler may read it
    for key in ("exp_name", "track", "wandb_project_name", "wandb_entity"):  # flags added since
        del state["args"][key]
    with open(run / "checkpoint.pkl", "wb") as f:
        pickle.dump(state, f)
    out = run_here(["--resume", str(run), "--max-iter", "2", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resuming at generation 1" in out.stdout and len(progress(run)) == 2
    config = json.loads((run / "args.json").read_text())
    assert config["exp_name"] == "train_ga" and config["track"] is False  # the defaults: the old behavior


def test_a_second_run_on_a_folder_in_use_is_refused_and_interrupted_writes_are_cleaned(tmp_path):
    flags = ["--run-name", "same", "--num-workers", "1", "--quiet", *TINY, "--hidden-sizes", "8"]
    first = subprocess.Popen([sys.executable, SCRIPT, *flags, "--max-iter", "100000", "--eval-every", "1000"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "same"
    try:
        wait_until((run / "checkpoint.pkl").exists, "the first run's first checkpoint", first)
        second = run_script([*flags, "--max-iter", "1"], cwd=tmp_path)
        assert "in use by another run" in assert_one_line_error(second)
        resumed = run_here(["--resume", str(run), "--max-iter", "100001", "--num-workers", "1"], cwd=tmp_path)
        assert "in use by another run" in assert_one_line_error(resumed)
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    (run / ".tmp-abc123checkpoint.pkl").write_bytes(b"half a checkpoint")  # a kill in an atomic write
    (run / ".tmp-mine").mkdir()  # not a file of ours: kept, and no reason to fail
    _, state = ga_mod.load_checkpoint(str(run))
    out = run_script(["--resume", str(run), "--max-iter", str(state["ga"]["generation"] + 1)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp-")] == [".tmp-mine"]
    again = run_script([*flags, "--max-iter", "1"], cwd=tmp_path)
    assert "already holds a run" in assert_one_line_error(again)  # ended runs are not started over


def test_a_resumed_progress_csv_loses_a_cut_last_line_and_an_emptied_one_is_refused(tmp_path):
    run = train(tmp_path, "cut", iters=2)
    whole = (run / "progress.csv").read_text()
    with open(run / "progress.csv", "a") as f:
        f.write("3,18,9")  # a crash or a full disk in the middle of the next generation's row
    out = run_here(["--resume", str(run), "--max-iter", "3", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [row["iteration"] for row in progress(run)] == ["1", "2", "3"]
    assert (run / "progress.csv").read_text().startswith(whole)
    (run / "progress.csv").write_text("")  # emptied
    line = assert_one_line_error(run_here(["--resume", run, "--max-iter", "4", "--num-workers", "1"], cwd=tmp_path))
    assert "has no header of this run's columns" in line and "generation 4" in line
    assert (run / "progress.csv").read_text() == ""  # left as it is


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_keeps_the_checkpoint_and_prints_the_resume_command(tmp_path, signum):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--run-name", "term", "--num-workers", "2", "--max-iter", "100000",
                             *TINY, "--hidden-sizes", "8", "--eval-every", "1000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # started with Ctrl-C ignored, as a non-interactive shell starts a background job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    checkpoint = tmp_path / "runs" / "term" / "checkpoint.pkl"
    wait_until(checkpoint.exists, "the run's first checkpoint", proc)
    time.sleep(0.3)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"--resume {os.path.join('runs', 'term')}" in stderr and "Traceback" not in stderr
    _, state = ga_mod.load_checkpoint(str(checkpoint))
    done = state["ga"]["generation"]
    assert done >= 1 and len(progress(tmp_path / "runs" / "term")) >= done


def test_reward_goal_stops_the_run(tmp_path):
    run = train(tmp_path, "g", "--eval-every", "1000", "--reward-goal", "5", iters=6)
    rows = progress(run)
    assert len(rows) == 1 and rows[0]["eval_return_mean"]  # the best member reached it: evaluated at once


def test_an_off_schedule_evaluation_is_screened_by_its_first_episodes():
    class Pool:  # each episode's return: its env seed mod 1000, known and different per episode
        def __init__(self):
            self.sizes = []

        def map(self, tasks, shared, label=None):
            self.sizes.append(len(tasks))
            return [ga_mod.RolloutResult([[float(task.env_seeds[0] % 1000)]], 7) for task in tasks]

    first = [ga_mod.derive_seed(4, ga_mod.EVAL_ENV_STREAM, 9, e) % 1000 for e in range(ga_mod.SCREEN_EPISODES)]
    args = SimpleNamespace(seed=4, num_eval_rollouts=30, quiet=True, reward_goal=float(np.mean(first)), multitask=False)

    def evaluation(screen):
        run = SimpleNamespace(args=args, pool=Pool(), ga=SimpleNamespace(generation=9), scales=np.ones(1))
        return run.pool.sizes, ga_mod.evaluation_of(run, np.zeros(3, np.float32), "evaluation 9", screen)
    full_sizes, full = evaluation(False)
    passed_sizes, passed = evaluation(True)  # the first episodes at the goal: the rest run too
    assert full_sizes == [30] and passed_sizes == [ga_mod.SCREEN_EPISODES, 30 - ga_mod.SCREEN_EPISODES]
    assert passed[0] == full[0] and np.array_equal(passed[1], full[1]) and passed[2] == full[2] == 7 * 30
    args.reward_goal += 0.5  # the first episodes now fall short: the evaluation stops after them
    stopped_sizes, (summary, returns, steps) = evaluation(True)
    assert stopped_sizes == [ga_mod.SCREEN_EPISODES] and np.array_equal(returns, full[1][:len(first)])
    assert steps == 7 * len(first) and summary["episodes"] == len(first)


def test_a_screened_out_best_member_gets_no_evaluation_row(tmp_path):
    # Seed 3: the best member reaches 60 in training at generation 2, but its first 10 evaluation episodes
    # average 44.5: no evaluation is recorded, and only those 10 episodes' steps are spent. Generation 3's
    # best member passes the screen (89.35 over 20 episodes) and the run stops there.
    flags = ["--seed", "3", "--max-episode-steps", "200", "--num-eval-rollouts", "20", "--eval-every"]
    screened = progress(train(tmp_path, "screened", *flags, "1000", "--reward-goal", "60", iters=6))
    never = progress(train(tmp_path, "never", *flags, "1000", "--reward-goal", "1e9", iters=3))
    full = progress(train(tmp_path, "full", *flags, "1", iters=3))  # full 20-episode evaluations each generation
    assert len(screened) == 3 and float(screened[1]["best_fitness"]) >= 60
    assert [r["eval_return_mean"] for r in screened] == ["", "", "89.35"]

    def spent(rows):  # env steps of generation 2
        return int(rows[1]["env_steps"]) - int(rows[0]["env_steps"])
    assert 0 < spent(screened) - spent(never) < spent(full) - spent(never)


def plain_episode(policy, env, seed):
    """(return, steps) of one episode of `policy` on `env` reset with `seed`, one Policy.act a step."""
    obs, _ = env.reset(seed=seed)
    total, steps, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy.act(obs))
        total, steps, done = total + float(reward), steps + 1, terminated or truncated
    env.close()
    return total, steps


def play(policy, env, seed):
    """The return of one episode of `policy` (its own weights) on `env` reset with `seed`, by `rollout`."""
    genotype = ga_mod.parameters_to_vector(policy.parameters()).numpy()
    returns, _ = ga_mod.rollout(policy, genotype[None], lambda b: env, [[seed]])
    return returns[0][0]


def test_from_pretrained_and_init_from(tmp_path):
    run = train(tmp_path, "ll", iters=2, env="LunarLander-v3")
    out = run_script(["--from-pretrained", str(run / "final.npz"), "--num-eval-rollouts", "3", "--num-workers", "2",
                      "--max-episode-steps", "50"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"episode_return mean=(\S+) std=(\S+) min=(\S+) max=(\S+) episodes=3", last)
    assert match, last
    params, meta = ga_mod.load_weights(str(run / "final.npz"))
    policy = ga_mod.build_policy(meta["policy"]).load(params)
    env = ga_mod.make_env(dict(meta["env"], max_episode_steps=50), training=False)
    returns = [play(policy, env, ga_mod.derive_seed(1, ga_mod.EVAL_ENV_STREAM, 0, e)) for e in range(3)]
    assert float(match.group(1)) == pytest.approx(np.mean(returns), abs=1e-3)
    # --init-from: member 0 of the first generation is the file's weights.
    init = train(tmp_path, "b", "--init-from", str(run / "final.npz"), "--seed", "5", iters=1, env="LunarLander-v3")
    _, state = ga_mod.load_checkpoint(str(init))
    assert np.array_equal(state["ga"]["population"][0], params)
    assert "--hidden-sizes" in assert_one_line_error(
        run_script(["--init-from", str(run / "final.npz"), "--hidden-sizes", "4"], cwd=tmp_path))


def test_distillation_end_to_end(tmp_path):
    teacher = train(tmp_path, "teacher", iters=2, env="LunarLander-v3")
    out = run_script(["--distill-from", str(teacher / "final.npz"), "--hidden-sizes", "3", "--distill-episodes", "2",
                      "--distill-rounds", "2", "--distill-epochs", "3", "--num-eval-rollouts", "3",
                      "--max-episode-steps", "50", "--run-name", "d"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    table = {row["model"]: row for row in csv.DictReader(open(tmp_path / "runs" / "d" / "distillation.csv"))}
    assert table["teacher"]["architecture"] == "8-8-4" and table["student"]["architecture"] == "8-3-4"
    assert int(table["student"]["parameters"]) == 8 * 3 + 3 + 3 * 4 + 4 < int(table["teacher"]["parameters"])
    assert re.search(r"teacher .* \| -?\d+\.\d\d ± \d+\.\d\d", out.stdout) and "round 2/2: student drove" in out.stdout
    # The student is a weights file of this script: it evaluates to the table's number on the same episodes.
    check = run_script(["--from-pretrained", str(tmp_path / "runs" / "d" / "student.npz"), "--num-eval-rollouts", "3",
                        "--max-episode-steps", "50"], cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    mean = float(re.search(r"episode_return mean=(\S+)", check.stdout).group(1))
    assert mean == pytest.approx(float(table["student"]["mean"]), abs=0.006)
    assert "--hidden-sizes" in assert_one_line_error(
        run_script(["--distill-from", str(teacher / "final.npz")], cwd=tmp_path))


def test_multitask_end_to_end_with_noise_study(tmp_path):
    run = train(tmp_path, "mt", "--multitask", "CartPole-v1", "BipedalWalker-v3", "--hidden-sizes", "6", "4",
                "--eval-every", "1", iters=2, workers=2)
    rows = progress(run)
    assert len(rows) == 2 and "return_mean[BipedalWalker-v3]" in rows[0]
    # Fitness is the sum of normalized returns: CartPole / 475 + BipedalWalker / 300.
    assert float(rows[0]["return_max"]) < 50 / 475 + 1
    study = list(csv.DictReader(open(run / "noise_study.csv")))
    assert [r["condition"] for r in study] == ["both real", "noise into CartPole-v1", "noise into BipedalWalker-v3",
                                               "noise into both"]
    assert (run / "noise_study.png").stat().st_size > 1000
    assert study[0]["CartPole-v1 mean"] != study[1]["CartPole-v1 mean"] or \
        study[0]["BipedalWalker-v3 mean"] != study[1]["BipedalWalker-v3 mean"]
    out = run_script(["--from-pretrained", str(run / "final.npz"), "--num-eval-rollouts", "2", "--max-episode-steps",
                      "50", "--run-name", "mt-eval"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "noise into both" in out.stdout and out.stdout.strip().splitlines()[-1].startswith("episode_return mean=")
    assert (tmp_path / "runs" / "mt-eval" / "noise_study.csv").exists()


@pytest.mark.parametrize("env_id,extra", [
    ("LunarLander-v3", ["--env-kwargs", "continuous=true", "--crossover", "one-point", "--selection", "roulette"]),
    ("CarRacing-v3", ["--frame-size", "48", "--frame-stack", "2", "--crossover", "uniform", "--mutation", "uniform"]),
])
def test_trains_on_other_envs_and_operators(tmp_path, env_id, extra):
    run = train(tmp_path, "e", *extra, "--num-eval-rollouts", "1", env=env_id, iters=2)
    rows = progress(run)
    assert len(rows) == 2 and all(np.isfinite(float(r["return_mean"])) for r in rows)


def test_capture_video(tmp_path):
    run = train(tmp_path, "v", "--capture-video", "--eval-every", "1", iters=1)
    videos = list((run / "videos").iterdir())
    assert [v.name.split(".")[0] for v in videos] == ["iter-00001"] and videos[0].stat().st_size > 1000


# ------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing damaged
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    (["--mutation-rate", "1.5"], "--mutation-rate must be a finite number >= 0.0 and <= 1.0"),
    (["--mutation-rate", "-0.1"], "--mutation-rate must be a finite number >= 0.0 and <= 1.0"),
    (["--crossover-rate", "2"], "--crossover-rate must be a finite number >= 0.0 and <= 1.0"),
    (["--population-size", "1"], "--population-size must be an integer >= 2"),
    (["--population-size", "5", "--replacement", "parents-vs-children"], "even"),
    (["--elite-size", "64"], "--elite-size"),
    (["--selection-pressure", "3"], "--selection-pressure"),
    (["--mutation-scale", "0"], "--mutation-scale"),
    (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv"),
    (["--env-id", "FrozenLake-v1"], "observation space"),
    (["--from-pretrained", "missing.npz"], "does not exist"),
    (["--resume", "nowhere"], "nowhere is not a readable checkpoint"),
    (["--hidden-sizes", "1000000000000"], "<= 2147483647"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    line = assert_one_line_error(run_script(args + ["--max-iter", "1"], cwd=tmp_path))
    assert expected in line


PRETRAINED = os.path.join(ROOT, "pretrained", "ga_cartpole.npz")


def weights_with(tmp_path, name, change):
    """pretrained/ga_cartpole.npz with its meta changed by change(meta), saved as tmp_path/name."""
    with np.load(PRETRAINED, allow_pickle=False) as data:
        params, meta = data["params"], json.loads(str(data["meta"]))
    change(meta)
    np.savez(tmp_path / name, params=params, meta=np.array(json.dumps(meta)))


BAD_INPUTS = [  # (flags, a word the error line names)
    *[([flag, value], flag) for flag, values in {
        "--population-size": ["0", "-3", "1.5", "abc", "100000000000"], "--max-iter": ["0", "-1"],
        "--num-workers": ["0"], "--num-rollouts": ["0", "3000000000"], "--num-eval-rollouts": ["0"], "--eval-every": ["0"], "--seed": ["-1", "nan"],
        "--max-episode-steps": ["0"], "--max-negative-steps": ["-1"], "--consecutive-goal-stopping": ["0"],
        "--tournament-size": ["0", "65"], "--elite-size": ["-1"], "--hidden-sizes": ["0", "-4"],
        "--frame-size": ["8"], "--frame-stack": ["0"], "--distill-episodes": ["0"], "--distill-rounds": ["0"],
        "--distill-epochs": ["0"], "--batch-size": ["0"], "--mutation-rate": ["nan", "inf", "1.0001"],
        "--mutation-scale": ["inf", "-1", "nan"], "--crossover-rate": ["nan", "-inf"], "--blx-alpha": ["-0.1", "inf"],
        "--selection-pressure": ["nan", "0.5"], "--reward-goal": ["nan", "inf", "-inf"],
        "--learning-rate": ["0", "nan", "-1e-3"], "--selection": ["best"], "--activation": ["gelu"]}.items()
      for value in values],
    (["--env-kwargs", "novalue"], "--env-kwargs"), (["--env-kwargs", "gravity=NaN"], "--env-kwargs"),
    (["--env-id", ""], "env id"), (["--env-id", "ALE/NoSuchGame-v5"], "NoSuchGame"),
    (["--multitask", "CartPole-v1", "NoSuchEnv-v0", "--hidden-sizes", "4", "4"], "NoSuchEnv"),
    (["--multitask", "CartPole-v1"], "--multitask"), (["--ray-address", "no-port"], "--ray-address"),
    (["--logs-dir", "afile"], "--logs-dir"), (["--logs-dir", "afile/runs"], "--logs-dir"),
    (["--run-name", "a/b"], "--run-name"), (["--run-name", ".."], "--run-name"), (["--run-name", ""], "--run-name"),
    (["--exp-name", "a/b"], "--exp-name"), (["--exp-name", ""], "--exp-name"),
    (["--resume", "adir"], "not a readable checkpoint"), (["--resume", "missing"], "not a readable checkpoint"),
    (["--resume", "afile"], "checkpoint"), (["--from-pretrained", "adir"], "directory"),
    (["--init-from", "missing.npz"], "does not exist"),
    (["--distill-from", "adir", "--hidden-sizes", "2"], "directory"),
    (["--from-pretrained", "afile"], "cannot read"), (["--resume", "adir", "--init-from", "afile"], "exclude"),
    *[(["--from-pretrained", f"{name}.npz"], word) for name, word in [
        ("env", "NoSuchEnv"), ("activation", "activation"), ("zero_width", "hidden"), ("float_width", "hidden"),
        ("script", "train_cmaes.py"), ("frame", "--frame-size"), ("no_policy", "meta"), ("shape", "does not fit"),
        ("actions", "does not fit"), ("kwargs", "--env-kwargs")]],
]
BAD_METAS = {"env": lambda m: m.update(env_id="NoSuchEnv-v0", env_ids=["NoSuchEnv-v0"]),
             "activation": lambda m: m["policy"].update(activation="gelu"),
             "zero_width": lambda m: m["policy"].update(hidden_sizes=[0]),
             "float_width": lambda m: m["policy"].update(hidden_sizes=[16.5]),
             "script": lambda m: m.update(script="train_cmaes.py"),
             "frame": lambda m: m["env"].update(frame_size=3), "no_policy": lambda m: m.pop("policy"),
             "shape": lambda m: m["policy"].update(obs_shape=["4"]),
             "actions": lambda m: m["policy"].update(num_actions=0),
             "kwargs": lambda m: m["env"].update(env_kwargs={"gravity": float("nan")})}


# main() of every case in one interpreter (a process per case would cost minutes): exit code and stderr each.
CASE_RUNNER = """
import contextlib, io, json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import train_ga
results = []
for folder, argv in json.loads(sys.stdin.read()):
    os.chdir(folder)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.TextIOWrapper(io.BytesIO())):
        try:
            code = train_ga.main(argv)
        except BaseException:
            code = traceback.print_exc()
    results.append((code, err.getvalue()))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    folders = []
    for i in range(len(BAD_INPUTS)):
        folders.append(tmp_path_factory.mktemp(f"bad{i}"))
        (folders[-1] / "afile").write_text("not a checkpoint, not weights")
        (folders[-1] / "adir").mkdir()
        for name, change in BAD_METAS.items():
            weights_with(folders[-1], f"{name}.npz", change)
    before = [sorted(p.name for p in folder.rglob("*")) for folder in folders]
    cases = [(str(folder), ["--max-iter", "1", *args]) for folder, (args, _) in zip(folders, BAD_INPUTS)]
    out = subprocess.run([sys.executable, "-c", CASE_RUNNER, ROOT], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    after = [sorted(p.name for p in folder.rglob("*")) for folder in folders]
    return json.loads(out.stdout.splitlines()[-1]), before, after


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)), ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_every_bad_input_is_one_line_and_writes_nothing(bad_input_results, index):
    (code, stderr), before, after = (results[index] for results in bad_input_results)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("train_ga.py: error: ") and BAD_INPUTS[index][1] in lines[0], lines[0]
    assert after == before  # nothing written, no run folder


def test_good_weights_files_still_load():
    paths = glob.glob(os.path.join(ROOT, "pretrained", "ga_*.npz"))
    assert PRETRAINED in paths
    for path in paths:
        params, meta = ga_mod.load_weights(path)
        assert params.dtype == np.float32 and params.size == meta["num_params"]


def process_children(pid):
    """pids whose parent is pid (read off /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc to find the workers")
def test_no_worker_outlives_a_killed_driver(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--run-name", "orphans", "--num-workers", "2", "--max-iter",
                             "100000", *TINY, "--hidden-sizes", "8", "--eval-every", "1000", "--quiet"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "runs" / "orphans" / "checkpoint.pkl"
    wait_until(checkpoint.exists, "the run's first checkpoint", proc)
    workers = process_children(proc.pid)
    assert len(workers) == 2, workers
    proc.kill()  # SIGKILL: no handler of the driver runs
    proc.wait()
    deadline = time.monotonic() + 5
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers)), "a worker outlived its driver by more than 5 s"


def test_bad_weights_and_checkpoints(tmp_path, in_process):
    def run_script(args, cwd):  # the refused inputs in this process
        return in_process(ga_mod, args, cwd)

    run = train(tmp_path, "ok", iters=1)  # a subprocess: the module-level run_script
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    params, meta = ga_mod.load_weights(str(run / "final.npz"))
    # Weights of another architecture: the meta says 8 hidden units, the file holds fewer values.
    np.savez(tmp_path / "short.npz", params=params[:-3], meta=np.array(json.dumps(meta)))
    assert "parameters" in assert_one_line_error(run_script(["--from-pretrained", "short.npz"], cwd=tmp_path))
    assert "parameters" in assert_one_line_error(run_here(["--init-from", "short.npz"], cwd=tmp_path))
    # ... or a policy for other spaces (CartPole's 4 inputs) on another env.
    lunar = dict(meta, env=dict(meta["env"], env_id="LunarLander-v3"), env_id="LunarLander-v3", env_ids=["LunarLander-v3"])
    np.savez(tmp_path / "foreign_env.npz", params=params, meta=np.array(json.dumps(lunar)))
    assert "does not fit" in assert_one_line_error(run_script(["--from-pretrained", "foreign_env.npz"], cwd=tmp_path))
    assert "LunarLander-v3" in assert_one_line_error(
        run_script(["--from-pretrained", str(run / "final.npz"), "--env-id", "LunarLander-v3"], cwd=tmp_path))
    es_meta = dict(meta, script="train_openai_es.py")
    np.savez(tmp_path / "es.npz", params=params, meta=np.array(json.dumps(es_meta)))
    assert "train_openai_es.py" in assert_one_line_error(run_script(["--from-pretrained", "es.npz"], cwd=tmp_path))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "cannot read" in assert_one_line_error(run_script(["--from-pretrained", "junk.npz"], cwd=tmp_path))
    # Checkpoints: truncated, foreign, crafted. None of them runs anything or touches the run folder.
    (tmp_path / "truncated.pkl").write_bytes((run / "checkpoint.pkl").read_bytes()[:100])
    assert "checkpoint" in assert_one_line_error(run_here(["--resume", "truncated.pkl"], cwd=tmp_path))
    (tmp_path / "foreign.pkl").write_bytes(pickle.dumps({"script": "train_cmaes.py", "format_version": 1}))
    assert "train_cmaes.py" in assert_one_line_error(run_here(["--resume", "foreign.pkl"], cwd=tmp_path))
    marker = tmp_path / "pwned"
    crafted = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (tmp_path / "crafted.pkl").write_bytes(crafted)
    assert "os.system" in assert_one_line_error(run_here(["--resume", "crafted.pkl"], cwd=tmp_path))
    assert not marker.exists()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"script": ga_mod.SCRIPT, "format_version": 1, "x": Evil()}))
    assert "refusing" in assert_one_line_error(run_here(["--resume", "evil.pkl"], cwd=tmp_path))
    assert not marker.exists()
    # Starting a new run in a folder that holds one would overwrite it: refused.
    assert "--resume" in assert_one_line_error(run_script(["--run-name", "ok", "--max-iter", "1"], cwd=tmp_path))
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Ray (--ray-address): the tests with a cluster skip where Ray is not installed
# ------------------------------------------------------------------------------------------------
def test_without_ray_the_flag_is_a_one_line_error(tmp_path):
    out = run_without_ray(SCRIPT, ["--ray-address", "auto"], cwd=tmp_path)
    assert "requirements-ray.txt" in assert_one_line_error(out)


def test_ray_cluster_run_equals_the_local_pool_run(tmp_path, ray_cluster):
    # Multitask: tasks carry the noise-study condition too.
    multitask = ["--multitask", "CartPole-v1", "Acrobot-v1", "--hidden-sizes", "8", "8"]
    local = train(tmp_path, "local", *multitask, workers=2)
    out = run_script(["--run-name", "ray", "--max-iter", "2", *TINY, *multitask],
                     cwd=tmp_path, env=dict(os.environ, RAY_ADDRESS=ray_cluster.address))  # as --ray-address
    assert out.returncode == 0, out.stderr
    assert f"Ray cluster at {ray_cluster.address} (2 CPUs on 1 node)" in out.stdout
    ray_run = tmp_path / "runs" / "ray"
    assert progress(ray_run, drop=("wall_time_s",)) == progress(local, drop=("wall_time_s",))
    assert {row["num_cpus"] for row in progress(ray_run, drop=())} == {"2"}
    assert (ray_run / "noise_study.csv").read_text() == (local / "noise_study.csv").read_text()


def test_ray_worker_killed_mid_run_costs_a_rerun_not_the_run(tmp_path, ray_cluster, rollout_killer):
    flags = ["--env-id", "BipedalWalker-v3", "--max-iter", "3", *TINY, "--hidden-sizes", "8",
             "--population-size", "8", "--max-episode-steps", "300", "--quiet"]
    killed, returncode, stderr = rollout_killer(
        [sys.executable, SCRIPT, "--run-name", "ray", "--ray-address", ray_cluster.address, *flags], tmp_path)
    assert killed is not None, "no rollout was running to be killed"
    assert returncode == 0, stderr
    local = run_script(["--run-name", "local", "--num-workers", "2", *flags], cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert progress(tmp_path / "runs" / "ray", drop=("wall_time_s",)) == progress(tmp_path / "runs" / "local",
                                                                                 drop=("wall_time_s",))


@pytest.mark.parametrize("activation", ["tanh", "relu", "selu"])
@pytest.mark.parametrize("discrete", [True, False])
def test_numpy_forward_of_the_mlp_matches_torch(activation, discrete):
    # act() runs the MLP in numpy; it must compute torch's forward (which distillation trains).
    policy = ga_mod.Policy([6], 3, discrete, (16, 8), activation)
    rng = np.random.default_rng(0)
    policy.load(rng.normal(size=ga_mod.num_params(policy)))
    for _ in range(20):
        obs = rng.normal(scale=3, size=6).astype(np.float32)
        with torch.no_grad():
            want = policy(torch.from_numpy(obs)).numpy()
        action = policy.act(obs)
        if discrete:
            assert action == int(want.argmax())
        else:
            assert action.dtype == np.float32 and np.allclose(action, want, atol=1e-5)
    # in-place updates (distillation's optimizer) are seen by act(); load() renews the views
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
    assert np.array_equal(policy.act(np.ones(6, np.float32)), 0 if discrete else np.zeros(3, np.float32))
    policy.load(np.ones(ga_mod.num_params(policy)))
    assert policy.act(np.ones(6, np.float32)) == 0 if discrete else np.all(policy.act(np.ones(6, np.float32)) > 0.99)


def test_help_shows_each_default_once(tmp_path):
    out = run_script(["--help"], cwd=tmp_path)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert text.count("(default: usable cores") == 1 and "(default: None)" not in text
    assert "(default: False)" not in text and "(default: [])" not in text
    parser = ga_mod.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:  # every flag's help names its default at most once
        assert formatter._get_help_string(action).count("(default:") <= 1, action.dest


@pytest.mark.parametrize("activation", ["tanh", "relu", "selu"])
@pytest.mark.parametrize("obs_dim,hidden,actions,discrete", [(4, (32, 32), 2, True), (24, (20, 12, 12), 4, False),
                                                              (8, (7,), 3, True), (3, (33, 5), 1, False)])
def test_a_batched_forward_gives_each_member_exactly_its_own_action(activation, obs_dim, hidden, actions, discrete):
    # Lockstep rollouts step B members with one batched forward: row b must be bit for bit what member b's
    # weights give on its observation alone, or lockstep would change the episodes.
    policy = ga_mod.Policy([obs_dim], actions, discrete, hidden, activation)
    rng = np.random.default_rng(obs_dim)
    genotypes = rng.normal(size=(11, ga_mod.num_params(policy))).astype(np.float32)
    obs = rng.normal(scale=3, size=(11, obs_dim)).astype(np.float32)
    batched = ga_mod.act_batch(policy, obs, ga_mod.stacked_layers(policy, genotypes))
    for member in (0, 4, 10):
        alone = policy.load(genotypes[member]).act(obs[member])
        assert alone == batched[member] if discrete else np.array_equal(alone, batched[member])
    subset = ga_mod.act_batch(policy, obs[[2, 9]], ga_mod.stacked_layers(policy, genotypes[[2, 9]]))
    assert (subset == [batched[2], batched[9]]) if discrete else np.array_equal(subset, batched[[2, 9]])


@pytest.mark.parametrize("env_id", ["CartPole-v1", "LunarLander-v3", "BipedalWalker-v3"])
def test_tasks_stepped_in_lockstep_give_what_each_gives_alone(env_id):
    # A worker steps a chunk's episodes together; each task's returns and steps must be those of the task run
    # alone (members end at different steps, two episodes each, Box2D envs rebuilt per episode).
    configs = ga_mod.env_configs_from_args(ga_mod.parse_args(["--env-id", env_id, "--max-episode-steps", "150"])[0])
    policy_config = ga_mod.policy_config_from_envs(configs, [8], "tanh")
    dim = ga_mod.num_params(ga_mod.build_policy(policy_config))
    worker = ga_mod.RolloutWorker(configs, policy_config, dim)
    worker.use(np.random.default_rng(2).normal(0, 0.5, 9 * dim).astype(np.float32))
    for training in (True, False):
        tasks = [ga_mod.RolloutTask(member, [100 + member, 200 + member], training) for member in range(9)]
        together = worker.run(tasks)
        assert len({steps for _, steps in together}) > 1  # the episodes do end at different steps
        assert together == [worker.run([task])[0] for task in tasks]  # B = 1
        for task, (returns, steps) in zip(tasks, together):  # the plain loop, through Policy.act
            policy = ga_mod.build_policy(policy_config).load(worker.members[task.member])
            alone = [plain_episode(policy, ga_mod.make_env(configs[0], training), s) for s in task.env_seeds]
            assert returns == [[r] for r, _ in alone] and steps == sum(n for _, n in alone)


# ------------------------------------------------------------------------------------------------
# Issue 13: --exp-name, TensorBoard, --track, progress bars, --help, spawn, the Python API
# ------------------------------------------------------------------------------------------------
def test_exp_name_names_the_default_run_folder(tmp_path):
    out = run_script(["--exp-name", "mine", "--max-iter", "1", *TINY, "--hidden-sizes", "8", "--num-workers", "1"],
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"CartPole-v1__mine__1__\d+", run.name), run.name
    assert json.loads((run / "args.json").read_text())["exp_name"] == "mine"
    line = assert_one_line_error(run_here(["--resume", str(run), "--exp-name", "other"], cwd=tmp_path))
    assert "--exp-name" in line and "checkpoint" in line  # a resumed run keeps its folder and its name
    assert build_default_run_name().startswith("CartPole-v1__train_ga__1__")


def build_default_run_name():
    return ga_mod.default_run_name(ga_mod.build_parser().parse_args([]))


def scalars(run_dir):
    """{tag: [(step, value)]} of every TensorBoard event file of a run folder, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


# TensorBoard gets the numbers themselves; progress.csv holds them to 6 significant digits (the wall time
# to the millisecond): they agree to the csv's precision.
CSV_PRECISION = {"rel": 6e-6}
WALL_TIME_PRECISION = {"abs": 6e-4}


def test_tensorboard_holds_the_progress_csv_numbers(tmp_path):
    run = train(tmp_path, "tb", "--eval-every", "2")
    rows = progress(run, drop=())
    found, acc = scalars(run)
    assert sorted(found) == sorted(column for column in rows[0] if column != "env_steps")
    for tag, points in found.items():
        expected = [(int(r["env_steps"]), float(r[tag])) for r in rows if r[tag] != ""]
        assert [step for step, _ in points] == [step for step, _ in expected], tag
        precision = WALL_TIME_PRECISION if tag == "wall_time_s" else CSV_PRECISION
        assert [value for _, value in points] == pytest.approx([value for _, value in expected], **precision), tag
    assert len(found["eval_return_mean"]) == 1 and len(found["return_mean"]) == 2  # no point for empty cells
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("|param|value|\n|-|-|\n") and "|population_size|6|" in text


def test_resumed_run_continues_the_tensorboard_curves(tmp_path):
    run = train(tmp_path, "tbr", "--eval-every", "1")
    from torch.utils.tensorboard import SummaryWriter
    late = SummaryWriter(str(run))  # points a killed session wrote after the checkpoint: hidden on resume
    late.add_scalar("return_mean", -1.0, global_step=int(progress(run)[-1]["env_steps"]) + 5)
    late.close()
    time.sleep(1)  # event files are read in the order of their names, which start with the unix time
    out = run_here(["--resume", str(run), "--max-iter", "4", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = progress(run)
    found, _ = scalars(run)
    for tag in ("return_mean", "eval_return_mean", "iteration"):
        assert [step for step, _ in found[tag]] == [int(r["env_steps"]) for r in rows], tag
    assert [value for _, value in found["return_mean"]] == pytest.approx([float(r["return_mean"]) for r in rows],
                                                                        **CSV_PRECISION)


def run_without_wandb(args, cwd):
    code = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_track_logs_to_wandb_offline_and_needs_wandb(tmp_path):
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path),
               WANDB_CONFIG_DIR=str(tmp_path / "config"), WANDB_CACHE_DIR=str(tmp_path / "cache"))
    out = run_script(["--run-name", "tracked", "--track", "--max-iter", "2", "--eval-every", "1", *TINY,
                      "--hidden-sizes", "8", "--num-workers", "1"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr + out.stdout
    run = tmp_path / "runs" / "tracked"
    (files,) = glob.glob(str(run / "wandb" / "offline-run-*" / "files"))
    names = {os.path.relpath(path, files) for path in glob.glob(os.path.join(files, "**"), recursive=True)}
    assert {"best.npz", "final.npz", "learning_curve.png"} <= names, names
    records = b"".join(open(path, "rb").read() for path in glob.glob(str(run / "wandb" / "offline-run-*" / "*.wandb")))
    assert all(column.encode() in records for column in ("return_mean", "eval_return_mean", "best_fitness", "env_steps"))
    assert not any("tfevents" in name for name in names), names  # logged, not synced (no copies)
    config = json.loads((run / "args.json").read_text())
    _, state = ga_mod.load_checkpoint(str(run))
    assert config["wandb_id"] and state["args"]["wandb_id"] == config["wandb_id"]  # --resume continues that run
    assert config["wandb_id"] in os.path.basename(os.path.dirname(files))
    (tmp_path / "bare").mkdir()
    line = assert_one_line_error(run_without_wandb(["--track", "--max-iter", "1"], tmp_path / "bare"))
    assert line == "train_ga.py: error: --track needs wandb: pip install -r requirements-track.txt"
    assert os.listdir(tmp_path / "bare") == []  # nothing written


BAR = re.compile(r"%\|.*episode/s")


def test_progress_bar_on_a_terminal_only(tmp_path):
    command = [sys.executable, SCRIPT, "--run-name", "bar", "--max-iter", "2", *TINY, "--hidden-sizes", "8",
               "--num-workers", "2", "--eval-every", "1"]
    code, text = run_on_terminal(command, tmp_path)
    assert code == 0, text
    assert BAR.search(text) and "generation 1" in text and "evaluation 1" in text, text
    piped = subprocess.run([*command[:3], "piped", *command[4:]], cwd=tmp_path, capture_output=True, text=True)
    assert piped.returncode == 0 and not BAR.search(piped.stdout + piped.stderr)
    assert "%|" not in piped.stderr and "\r" not in piped.stdout + piped.stderr  # one line per generation
    code, text = run_on_terminal([*command, "--quiet", "--run-name", "quiet"], tmp_path)
    assert code == 0 and not BAR.search(text)
    code, text = run_on_terminal([sys.executable, SCRIPT, "--from-pretrained", PRETRAINED, "--num-eval-rollouts", "3",
                                  "--max-episode-steps", "50", "--num-workers", "1"], tmp_path)
    assert code == 0 and BAR.search(text) and "evaluation" in text, text


def test_distillation_shows_its_progress_on_a_terminal(tmp_path):
    code, text = run_on_terminal([sys.executable, SCRIPT, "--distill-from", PRETRAINED, "--hidden-sizes", "2",
                                  "--distill-episodes", "2", "--distill-epochs", "3", "--num-eval-rollouts", "2",
                                  "--max-episode-steps", "50", "--num-workers", "1"], tmp_path)
    assert code == 0, text
    for label in ("round 1/1: teacher", "round 1/1: student fit", "evaluation of the teacher",
                  "evaluation of the student"):
        assert label in text, label
    assert "epoch/s" in text and BAR.search(text)


def test_help_is_fast_and_shows_the_examples():
    heavy, text = modules_imported_by_help(SCRIPT)
    assert heavy in ([], ["tqdm"])
    assert "Examples:\n    # CartPole-v1" in text and "python train_ga.py --distill-from" in text
    assert 'More: README.md, section "train_ga.py"' in text and "--exp-name" in text and "--track" in text


def test_runs_as_on_macos_with_spawned_workers(tmp_path):
    out = run_as_on_macos(SCRIPT, ["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"(default: usable cores, here {os.cpu_count()})" in " ".join(out.stdout.split())  # os.cpu_count()
    flags = ["--max-iter", "2", *TINY, "--hidden-sizes", "8", "--num-workers", "2", "--eval-every", "1"]
    out = run_as_on_macos(SCRIPT, ["--run-name", "spawn", *flags], tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    forked = train(tmp_path, "fork", "--eval-every", "1", workers=2)
    assert progress(tmp_path / "runs" / "spawn") == progress(forked)


API_EXAMPLE = """
import numpy as np
from train_ga import GeneticAlgorithm

ga = GeneticAlgorithm(np.random.default_rng(0).normal(size=(64, 10)))  # 64 members, 10 genes
for generation in range(100):
    candidates = ga.ask()                               # float32 (64, 10)
    ga.tell(-np.square(candidates - 3).sum(axis=1))     # their fitness: higher is better
x, fitness = ga.best()
print(f"best fitness {fitness:.4f}, x = {np.round(x, 2)}")
"""


def test_python_api_example_improves_the_fitness(tmp_path):
    out = subprocess.run([sys.executable, "-c", API_EXAMPLE], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    best = float(re.search(r"best fitness (\S+),", out.stdout).group(1))
    start = -np.square(np.random.default_rng(0).normal(size=(64, 10)) - 3).sum(1).max()
    assert start < -40 and best > -0.5, out.stdout  # from about -60 to near the optimum 0
    assert os.listdir(tmp_path) == []  # importing the script wrote nothing


def test_a_pixel_policy_squashes_continuous_actions_once():
    # The action of a frame policy with continuous actions is tanh of its head, as the vector MLP's: squashed
    # twice it could never leave [-tanh(1), tanh(1)] = [-0.76, 0.76] of CarRacing's [-1, 1] range.
    policy = ga_mod.Policy((2, 40, 40), 3, discrete=False, hidden_sizes=(8,))
    params = parameters_to_vector(policy.parameters()).numpy().copy()
    params[-3:] = [3.0, -3.0, 0.5]  # the head's bias: tanh gives 0.995, -0.995, 0.46 whatever the frame
    params[-3 - policy.head.weight.numel():-3] = 0.0
    policy.load(params)
    frame = np.random.default_rng(0).integers(0, 256, (2, 40, 40), dtype=np.uint8)
    action = policy.act(frame)
    np.testing.assert_allclose(action, np.tanh([3.0, -3.0, 0.5]), rtol=1e-6)
    np.testing.assert_allclose(action, policy(policy.preprocess(frame)).numpy(), rtol=1e-6)


def test_a_policy_too_large_for_memory_is_a_clear_error():
    # (2^31 - 1)^2 float32 weights, about 2^64 bytes: torch's allocator refuses them on any machine.
    config = dict(obs_shape=[2 ** 31 - 1], discrete=True, num_actions=2, hidden_sizes=[2 ** 31 - 1], activation="tanh")
    with pytest.raises(ga_mod.UserError, match="do not fit in"):
        ga_mod.build_policy(dict(config))
