"""Tests of train_openai_es.py: operators and invariants in-process, whole runs through subprocess."""

import csv
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

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import train_openai_es as es_mod
from conftest import (RayCluster, free_port, modules_imported_by_help, run_as_on_macos, run_main, run_on_terminal,
                      run_without_ray, wait_until)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_openai_es.py")
AUTHORS_WEIGHTS = os.path.join(ROOT, "..", "shared", "weights", "attentionagent_carracing.npz")
TINY = ["--population-size", "4", "--max-episode-steps", "50", "--num-eval-rollouts", "2",
        "--sigma", "0.1", "--learning-rate", "0.05"]


def run_script(args, cwd, timeout=300, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_here(args, cwd):
    """run_script's result from main() in this process: no seconds of imports."""
    return run_main(es_mod, args, cwd)


def train(tmp_path, name, *extra, env="CartPole-v1", workers=1, iters=2, environ=None):
    architecture = [] if "--init-from" in extra else ["--hidden-sizes", "8"]  # an init file brings its own
    args = ["--env-id", env, "--run-name", name, "--num-workers", str(workers), "--max-iter", str(iters), *TINY,
            *architecture, *extra]
    if workers == 1 and environ is None:  # in this process: no seconds of imports
        out = run_main(es_mod, args, tmp_path)
    else:
        out = run_script(args, cwd=tmp_path, env=environ)
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


# ------------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------------
def test_centered_ranks_zero_sum_bounds_order_and_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=101)
    r = es_mod.centered_ranks(x)
    assert abs(r.sum()) < 1e-12
    assert r.min() == -0.5 and r.max() == 0.5
    assert np.array_equal(np.argsort(r), np.argsort(x))
    tied = es_mod.centered_ranks([3.0, 1.0, 3.0, 2.0])
    assert tied[0] == tied[2] and abs(tied.sum()) < 1e-12
    assert np.allclose(tied, [1 / 3, -0.5, 1 / 3, -1 / 6])


@pytest.mark.parametrize("method", ["centered-rank", "z-score", "none"])
def test_all_equal_returns_give_zero_gradient_not_nan(method):
    shaped = es_mod.shape_fitness(np.full(8, 7.0), method)
    assert np.all(np.isfinite(shaped))
    es = es_mod.OpenAIES(np.ones(5), 8, sigma=0.1, antithetic=False, fitness_shaping=method)
    g = es.gradient(np.full(8, 7.0))
    assert np.all(np.isfinite(g))
    if method != "none":
        assert np.all(g == 0)


@pytest.mark.parametrize("method", ["centered-rank", "z-score", "none"])
def test_mirrored_pairs_cancel_on_constant_fitness(method):
    es = es_mod.OpenAIES(np.zeros(20), 10, sigma=0.05, antithetic=True, fitness_shaping=method)
    population = es.ask()
    assert np.array_equal(population[0::2, 0], population[1::2, 0])  # a pair shares its noise
    assert np.array_equal(population[:, 1], np.tile([1, -1], 5))
    theta_plus = es_mod.perturb(es.theta, es.sigma, *population[0])
    theta_minus = es_mod.perturb(es.theta, es.sigma, *population[1])
    assert np.allclose(theta_plus + theta_minus, 2 * es.theta)
    assert np.all(es.gradient(np.full(10, -3.5)) == 0)


def test_gradient_is_the_papers_estimate():
    es = es_mod.OpenAIES(np.zeros(6), 4, sigma=0.2, antithetic=False, fitness_shaping="none", seed=3)
    population = es.ask()
    returns = np.array([1.0, -2.0, 0.5, 4.0])
    eps = np.stack([es_mod.sample_noise(s, 6) for s, _ in population])
    expected = (returns[:, None] * eps).sum(0) / (4 * 0.2)
    assert np.allclose(es.gradient(returns), expected, atol=1e-5)
    # Mirrored: (F+ - F-) eps_k / (N sigma)
    es = es_mod.OpenAIES(np.zeros(6), 4, sigma=0.2, antithetic=True, fitness_shaping="none", seed=3)
    population = es.ask()
    eps = np.stack([es_mod.sample_noise(s, 6) for s, _ in population[0::2]])
    expected = ((returns[0::2] - returns[1::2])[:, None] * eps).sum(0) / (4 * 0.2)
    assert np.allclose(es.gradient(returns), expected, atol=1e-5)


def test_weight_decay_and_schedules():
    es = es_mod.OpenAIES(np.full(3, 2.0), 4, sigma=0.5, learning_rate=0.1, optimizer="sgd", momentum=0.0,
                         weight_decay=0.5, lr_decay=0.5, lr_min=0.03, sigma_decay=0.5, sigma_min=0.2)
    es.tell(np.zeros(4))  # no signal: only the L2 term moves theta towards 0
    assert np.allclose(es.theta, 2.0 - 0.1 * 0.5 * 2.0)
    assert es.learning_rate == 0.05 and es.sigma == 0.25
    es.tell(np.zeros(4))
    assert es.learning_rate == 0.03 and es.sigma == 0.2  # the floors


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.03), ("sgd", 0.2)])
def test_quadratic_from_the_openai_blog_converges(optimizer, lr):
    # Maximize -|w - solution|^2 (https://openai.com/blog/evolution-strategies/).
    solution = np.array([0.5, 0.1, -0.3], dtype=np.float32)
    es = es_mod.OpenAIES(np.zeros(3), 50, sigma=0.1, learning_rate=lr, optimizer=optimizer,
                         weight_decay=0.0, seed=0)
    start = np.linalg.norm(es.theta - solution)
    for _ in range(300):
        population = es.ask()
        returns = [-np.sum((es_mod.perturb(es.theta, es.sigma, s, sign) - solution) ** 2) for s, sign in population]
        es.tell(returns)
    assert np.linalg.norm(es.theta - solution) < 0.05 * start


def test_es_state_round_trips_through_pickle():
    es = es_mod.OpenAIES(np.arange(4.0), 6, sigma=0.1)
    es.tell(np.arange(6.0))
    clone = es_mod.OpenAIES.from_state_dict(pickle.loads(pickle.dumps(es.state_dict())))
    es.tell(np.arange(6.0)[::-1])
    clone.tell(np.arange(6.0)[::-1])
    assert np.array_equal(es.theta, clone.theta) and np.array_equal(es.ask(), clone.ask())


def test_seeds_are_derived_not_drawn():
    assert es_mod.derive_seed(1, 2, 3) == es_mod.derive_seed(1, 2, 3)
    assert len({es_mod.derive_seed(1, 1, g, m) for g in range(20) for m in range(20)}) == 400
    assert np.array_equal(es_mod.sample_noise(7, 100), es_mod.sample_noise(7, 100))


# ------------------------------------------------------------------------------------------------
# Policy and env
# ------------------------------------------------------------------------------------------------
def make_policy(obs_shape, num_actions, discrete, hidden_sizes, activation="tanh", recurrent=False,
                action_bounding="scale", obs_norm=True):
    """es_mod.Policy with the flags' defaults for what a test does not set."""
    return es_mod.Policy(obs_shape, num_actions, discrete, hidden_sizes, activation, recurrent, action_bounding,
                         obs_norm)


def test_mlp_parameter_count_and_flat_vector_round_trip():
    policy = make_policy(obs_shape=(4,), num_actions=2, discrete=True, hidden_sizes=(64, 64))
    theta = parameters_to_vector(policy.parameters())
    assert theta.numel() == 4 * 64 + 64 + 64 * 64 + 64 + 64 * 2 + 2
    new = torch.randn_like(theta)
    vector_to_parameters(new, policy.parameters())
    assert torch.equal(parameters_to_vector(policy.parameters()), new)
    assert torch.equal(policy.layers[0].weight.flatten(), new[:256])  # weights then bias, layer by layer


def test_policy_actions_discrete_box_and_normalization():
    discrete = make_policy(obs_shape=(3,), num_actions=4, discrete=True, hidden_sizes=(8,))
    action, _ = discrete.act(np.ones(3, np.float32))
    assert isinstance(action, int) and 0 <= action < 4
    box = make_policy(obs_shape=(3,), num_actions=2, discrete=False, hidden_sizes=(8,))
    with torch.no_grad():
        box.head.bias.fill_(100.0)
    action, _ = box.act(np.ones(3, np.float32))
    assert action.shape == (2,) and np.all(action <= 1) and np.all(action > 0.99)  # tanh-squashed
    clip = make_policy(obs_shape=(3,), num_actions=2, discrete=False, hidden_sizes=(8,), action_bounding="clip")
    with torch.no_grad():
        clip.head.bias.fill_(100.0)
    assert np.all(clip.act(np.ones(3, np.float32))[0] > 50)  # raw: the env's ClipAction bounds it
    # Normalization: an observation equal to the mean acts like a zero observation.
    policy = make_policy(obs_shape=(3,), num_actions=2, discrete=False, hidden_sizes=(8,))
    zero = policy.act(np.zeros(3, np.float32))[0]
    policy.obs_mean, policy.obs_std = np.array([5.0, -2.0, 1.0], np.float32), np.full(3, 2.0, np.float32)
    assert np.allclose(policy.act(np.array([5.0, -2.0, 1.0], np.float32))[0], zero)
    # Clipped to [-5, 5] after normalization.
    far = policy.act(np.array([1e6, -1e6, 1e6], np.float32))[0]
    assert np.allclose(far, policy.act(np.array([5 + 10, -2 - 10, 1 + 10], np.float32))[0])


def test_conv_lstm_policy_on_pixels():
    policy = make_policy(obs_shape=(4, 64, 64), num_actions=3, discrete=False, hidden_sizes=(32,), recurrent=True)
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 64, 64), dtype=np.uint8)
    with torch.inference_mode():
        a1, state = policy.act(frames)
        a2, state2 = policy.act(frames, state)
    assert a1.shape == (3,) and state[0].shape == (32,)
    assert not np.allclose(a1, a2)  # the LSTM state carries over between steps
    rgb = make_policy(obs_shape=(2, 40, 40, 3), num_actions=5, discrete=True, hidden_sizes=(16,))
    assert rgb.conv[0].in_channels == 6
    assert isinstance(rgb.act(np.zeros((2, 40, 40, 3), np.uint8))[0], int)


def env_config(env_id, **overrides):
    config = es_mod.configs(es_mod.parse_args(["--env-id", env_id])[0])[0]
    config.update(overrides)
    return config


def rollout_pool(num_workers, worker_args, shared):
    """A local RolloutPool of num_workers for batches of the arrays `shared` (theta, obs mean, obs std)."""
    return es_mod.RolloutPool(num_workers, None, es_mod.RolloutWorker, worker_args, [np.size(a) for a in shared])


def configs(*flags):
    """(env config, policy config, parameter count) of a command line."""
    env_config, policy_config = es_mod.configs(es_mod.parse_args(list(flags))[0])
    return env_config, policy_config, sum(p.numel() for p in es_mod.make_policy(policy_config).parameters())


def test_make_env_pixels_and_actions():
    env = es_mod.make_env(env_config("CarRacing-v3"), training=True)
    assert env.observation_space.shape == (4, 64, 64)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 64, 64) and obs.dtype == np.uint8
    assert isinstance(env, gym.wrappers.FrameStackObservation)
    env.close()
    # CarRacing's bounds ([-1,1], [0,1], [0,1]) are rescaled for the tanh output; BipedalWalker's are not.
    car = es_mod.make_env(env_config("CarRacing-v3", frame_stack=1), training=False)
    assert np.all(car.action_space.low == -1) and np.all(car.action_space.high == 1)
    assert env_config("CarRacing-v3")["max_negative_steps"] == 20
    assert env_config("CartPole-v1")["max_negative_steps"] == 0


def test_negative_reward_early_stop():
    class Constant(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (1,))
        action_space = gym.spaces.Discrete(2)

        def reset(self, seed=None, options=None):
            return np.zeros(1, np.float32), {}

        def step(self, action):
            return np.zeros(1, np.float32), (1.0 if action else -0.1), False, False, {}

    env = es_mod.NegativeRewardEarlyStop(Constant(), patience=3)
    env.reset()
    assert [env.step(0)[3] for _ in range(3)] == [False, False, True]
    env.reset()
    flags = [env.step(a)[3] for a in (0, 0, 1, 0, 0, 0)]
    assert flags == [False, False, False, False, False, True]  # a positive reward resets the count


@pytest.mark.parametrize("env_id,kwargs", [("CartPole-v1", {}), ("LunarLander-v3", {}),
                                           ("LunarLander-v3", {"continuous": True}), ("BipedalWalker-v3", {})])
def test_rollout_worker_runs_members_and_collects_stats(env_id, kwargs):
    config, policy_config, dim = configs("--env-id", env_id, "--max-episode-steps", "30", "--hidden-sizes", "8",
                                         "--env-kwargs", *(f"{k}={json.dumps(v)}" for k, v in kwargs.items()))
    obs_dim = policy_config["obs_shape"][0]
    shared = (np.zeros(dim, np.float32), np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32))
    pool = rollout_pool(1, (config, policy_config), shared)
    (returns, steps, stats), = pool.map([es_mod.RolloutTask(5, 1, 0.1, [11, 12], True)], shared)
    assert len(returns) == 2 and 2 <= steps <= 60
    count, total, total_sq = stats
    assert count == steps and total.shape == (obs_dim,) and np.all(total_sq >= 0)
    for _ in range(4):  # deterministic in (noise seed, sign, env seeds), whatever ran before
        assert pool.map([es_mod.RolloutTask(5, 1, 0.1, [11, 12], True)], shared)[0][0] == returns
    assert pool.map([es_mod.RolloutTask(5, 1, 0.1, [11], False)], shared)[0][2] is None  # evaluations collect nothing


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


def cartpole_pool_setup():
    config, policy_config, dim = configs("--hidden-sizes", "8")
    theta = np.random.default_rng(0).normal(0, 0.5, dim).astype(np.float32)
    return (config, policy_config), (theta, np.zeros(4, np.float32), np.ones(4, np.float32))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker processes in /proc")
def test_two_workers_match_in_process_and_survive_a_killed_worker(capsys, monkeypatch):
    worker_args, shared = cartpole_pool_setup()
    tasks = [es_mod.RolloutTask(s, sign, 0.5, [s], True) for s in range(40) for sign in (1, -1)]
    expected = rollout_pool(1, worker_args, shared).map(tasks, shared)
    pool = rollout_pool(2, worker_args, shared)
    try:
        assert [r[0] for r in pool.map(tasks, shared)] == [r[0] for r in expected]
        finished = []  # the progress bar's count: each task's episodes and steps as it finishes, whatever the order
        live_bar = es_mod.live_bar

        def counting_bar(*args):
            bar = live_bar(*args)
            bar.done = lambda episodes, steps: finished.append((episodes, steps))
            return bar

        monkeypatch.setattr(es_mod, "live_bar", counting_bar)
        assert [r[:2] for r in pool.map(tasks, shared, "generation 1")] == [r[:2] for r in expected]
        assert sorted(finished) == sorted((len(r[0]), r[1]) for r in expected)
        victim = next(iter(pool.executor._processes))  # not children(): a Ray cluster of the session is one too
        capsys.readouterr()
        os.kill(victim, signal.SIGKILL)  # dead before the map: however fast the rollouts, the map meets it
        results = pool.map(tasks * 5, shared)
        assert [r[0] for r in results] == [r[0] for r in expected * 5]
        warnings = capsys.readouterr().out.splitlines()
        assert len(warnings) == 1 and "restarting" in warnings[0]
        assert victim not in children(os.getpid()) and len(pool.executor._processes) == 2
        assert all(pid in children(os.getpid()) for pid in pool.executor._processes)
    finally:
        workers = list(pool.executor._processes)
        pool.close()
    assert not set(workers) & set(children(os.getpid()))


def test_workers_that_keep_dying_end_the_batch_with_pool_lost(monkeypatch, capsys):
    worker_args, shared = cartpole_pool_setup()
    monkeypatch.setattr(es_mod.RolloutWorker, "run", lambda self, task: os._exit(1))  # the forked workers inherit it
    pool = rollout_pool(2, worker_args, shared)
    try:
        with pytest.raises(es_mod.PoolLost, match="keep dying"):
            pool.map([es_mod.RolloutTask(1, 1, 0.5, [1], True)] * 4, shared)
    finally:
        pool.close()
    assert len([line for line in capsys.readouterr().out.splitlines() if "restarting" in line]) == es_mod.WORKER_TRIES - 1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the worker processes in /proc")
def test_no_worker_outlives_a_killed_driver(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--run-name", "orphans", "--num-workers", "2", "--max-iter",
                             "100000", *TINY, "--hidden-sizes", "8", "--eval-every", "1000", "--quiet"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "runs" / "orphans" / "checkpoint.pkl"
    wait_until(checkpoint.exists, "the run's first checkpoint", proc)
    workers = children(proc.pid)
    assert len(workers) >= 2, workers
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read()
                 .rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"workers {alive} outlived their driver by more than 5 s"


def test_restricted_unpickler_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps({"script": es_mod.SCRIPT, "x": Evil()}))
    with pytest.raises(es_mod.UserError, match="posix.system|os.system|refusing"):
        es_mod.load_checkpoint(str(path))
    assert not marker.exists()


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
    assert {"sigma", "learning_rate", "center_return", "center_rank"} <= set(header)
    rows = progress(run)
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert [int(r["evaluations"]) for r in rows] == [4, 8]
    assert all(r["eval_return_mean"] for r in rows)
    assert all(1 <= int(r["center_rank"]) <= 5 for r in rows)
    config = json.loads((run / "args.json").read_text())
    assert config["sigma"] == 0.1 and config["versions"]["torch"].startswith("2.13.0")
    assert any(blas.startswith("openblas ") for blas in config["versions"]["blas"])  # its kernels named
    with np.load(run / "final.npz", allow_pickle=False) as data:
        assert data["params"].dtype == np.float32 and data["params"].ndim == 1
        meta = json.loads(str(data["meta"]))
    assert meta["script"] == "train_openai_es.py" and meta["env_id"] == "CartPole-v1"
    assert meta["policy"]["hidden_sizes"] == [8] and len(meta["obs_norm"]["mean"]) == 4
    assert meta["obs_norm"]["std"] != [1.0] * 4  # statistics of the rollouts, not the initial ones
    # the last generation was evaluated: final.npz carries that evaluation (same theta, same episodes)
    assert sorted(meta["evaluation"]) == ["episodes", "mean", "std"]
    assert f"{meta['evaluation']['mean']:.6g}" == rows[-1]["eval_return_mean"]


def test_one_and_two_workers_give_the_same_run(tmp_path):
    one = train(tmp_path, "w1", "--eval-every", "2", workers=1, iters=3)
    two = train(tmp_path, "w2", "--eval-every", "2", workers=2, iters=3)
    assert progress(one) == progress(two)
    assert np.array_equal(np.load(one / "final.npz")["params"], np.load(two / "final.npz")["params"])


def test_resume_is_exact(tmp_path):
    straight = train(tmp_path, "straight", "--eval-every", "2", iters=5)
    # stopped at generation 3, off the evaluation schedule: that run's final evaluation stays out of the record
    split = train(tmp_path, "split", "--eval-every", "2", iters=3)
    assert es_mod.load_weights(str(split / "final.npz"))[1]["evaluation"]["episodes"] > 0
    out = run_here(["--resume", str(split), "--max-iter", "5", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resuming at generation 3" in out.stdout
    assert progress(straight) == progress(split)
    assert [r["eval_return_mean"] != "" for r in progress(split)] == [False, True, False, True, False]
    assert np.array_equal(np.load(straight / "final.npz")["params"], np.load(split / "final.npz")["params"])


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path):
    run = train(tmp_path, "r", iters=2)
    reference = progress(run)
    with open(run / "progress.csv", "a") as f:  # as if killed between the CSV row and the checkpoint
        f.write("3,12,1,1,1,1,1,1,,,1,1,1,1,1,1\r\n")
    out = run_here(["--resume", str(run), "--max-iter", "3", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = progress(run)
    assert rows[:2] == reference and len(rows) == 3 and rows[2]["evaluations"] == "12" and rows[2]["env_steps"] != "1"


def test_resume_refuses_algorithm_changes(tmp_path):
    run = train(tmp_path, "r", iters=1)
    line = assert_one_line_error(run_here(["--resume", str(run), "--sigma", "0.5"], cwd=tmp_path))
    assert "--sigma" in line


def test_sigint_keeps_the_checkpoint_and_prints_the_resume_command(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--run-name", "int", "--num-workers", "2", "--max-iter", "100000",
                             *TINY, "--max-episode-steps", "500", "--eval-every", "1000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # started with Ctrl-C ignored, as a non-interactive shell starts a background job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    checkpoint = tmp_path / "runs" / "int" / "checkpoint.pkl"
    wait_until(checkpoint.exists, "the run's first checkpoint", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"--resume {os.path.join('runs', 'int')}" in stderr and "Traceback" not in stderr
    _, state = es_mod.load_checkpoint(str(checkpoint))
    done = state["es"]["generation"]
    assert done >= 1 and len(progress(tmp_path / "runs" / "int")) >= done
    out = run_here(["--resume", tmp_path / "runs" / "int", "--max-iter", done + 1, "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [int(r["iteration"]) for r in progress(tmp_path / "runs" / "int")] == list(range(1, done + 2))


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--run-name", "term", "--num-workers", "2",
                             "--max-iter", "100000", *TINY, "--eval-every", "1000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "runs" / "term" / "checkpoint.pkl"
    wait_until(checkpoint.exists, "the run's first checkpoint", proc)
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resume with" in stderr
    es_mod.load_checkpoint(str(checkpoint))


def test_reward_goal_with_consecutive_stopping(tmp_path):
    run = train(tmp_path, "g1", "--eval-every", "1", "--reward-goal", "1", iters=6)
    assert len(progress(run)) == 1
    run = train(tmp_path, "g3", "--eval-every", "1", "--reward-goal", "1", "--consecutive-goal-stopping", "3", iters=6)
    assert len(progress(run)) == 3
    run = train(tmp_path, "never", "--eval-every", "1", "--reward-goal", "1e9", iters=3)
    assert len(progress(run)) == 3
    # Off schedule: a center that reaches the goal in training is evaluated at once.
    run = train(tmp_path, "center", "--eval-every", "1000", "--reward-goal", "1", iters=6)
    rows = progress(run)
    assert len(rows) == 1 and rows[0]["eval_return_mean"] and float(rows[0]["center_return"]) >= 1


def test_an_off_schedule_evaluation_is_screened_by_its_first_episodes():
    class Pool:  # each episode's return: its env seed mod 1000, known and different per episode
        def __init__(self):
            self.sizes = []

        def map(self, tasks, shared, progress=None):
            self.sizes.append(len(tasks))
            return [es_mod.RolloutResult([float(task[3][0] % 1000)], 7, None) for task in tasks]

    first = [es_mod.derive_seed(4, es_mod.EVAL_ENV_STREAM, 9, e) % 1000 for e in range(es_mod.SCREEN_EPISODES)]
    args = SimpleNamespace(seed=4, num_eval_rollouts=30, quiet=True, reward_goal=float(np.mean(first)))
    theta, mean_std = np.zeros(3, np.float32), (np.zeros(0, np.float32), np.ones(0, np.float32))
    full_pool, passed_pool, stopped_pool = Pool(), Pool(), Pool()
    full = es_mod.evaluate(full_pool, theta, mean_std, args, 9)
    passed = es_mod.evaluate(passed_pool, theta, mean_std, args, 9, screen=True)  # first episodes at the goal
    assert full_pool.sizes == [30] and passed_pool.sizes == [es_mod.SCREEN_EPISODES, 30 - es_mod.SCREEN_EPISODES]
    assert np.array_equal(passed[0], full[0]) and passed[1:] == full[1:] and passed[2]["episodes"] == 30
    args.reward_goal += 0.5  # the first episodes now fall short: the evaluation stops after them
    returns, steps, summary = es_mod.evaluate(stopped_pool, theta, mean_std, args, 9, screen=True)
    assert stopped_pool.sizes == [es_mod.SCREEN_EPISODES] and np.array_equal(returns, full[0][:len(first)])
    assert steps == 7 * len(first) and summary["episodes"] == len(first)


def test_a_screened_out_center_gets_no_evaluation_row(tmp_path):
    # Seed 3: the center reaches 40 in training at generations 1 and 2, but its first 10 evaluation episodes
    # average 30.6 and 23.0: no evaluation is recorded, and only those 10 episodes' steps are spent.
    flags = ["--seed", "3", "--num-eval-rollouts", "20", "--eval-every"]
    screened = progress(train(tmp_path, "screened", *flags, "1000", "--reward-goal", "40", iters=8))
    never = progress(train(tmp_path, "never", *flags, "1000", "--reward-goal", "1e9", iters=8))
    full = progress(train(tmp_path, "full", *flags, "1", iters=8))  # full 20-episode evaluations each generation
    assert [float(r["center_return"]) >= 40 for r in screened[:2]] == [True, True]
    assert [r["eval_return_mean"] for r in screened[:2]] == ["", ""] and screened[-1]["eval_return_mean"]
    first_steps = int(screened[0]["env_steps"]) - int(never[0]["env_steps"])
    assert 0 < first_steps < int(full[0]["env_steps"]) - int(never[0]["env_steps"])


def play(policy, env, seed):
    """The return of one episode of `policy` (its own weights) on `env` reset with `seed`."""
    genotype = es_mod.parameters_to_vector(policy.parameters()).numpy()
    returns, _ = es_mod.rollout(policy, genotype[None], lambda b: env, [[seed]])
    return returns[0][0]


def test_from_pretrained_round_trip(tmp_path):
    run = train(tmp_path, "cp", iters=3, env="LunarLander-v3")
    out = run_script(["--from-pretrained", str(run / "final.npz"), "--num-eval-rollouts", "3", "--num-workers", "2",
                      "--max-episode-steps", "50"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"episode_return mean=(\S+) std=(\S+) min=(\S+) max=(\S+) episodes=3", last)
    assert match, last
    # The same numbers from the file rebuilt by hand: weights, normalization and env all come from it.
    params, meta = es_mod.load_weights(str(run / "final.npz"))
    policy = es_mod.make_policy(meta["policy"], params, (meta["obs_norm"]["mean"], meta["obs_norm"]["std"]))
    config = dict(meta["env"], max_episode_steps=50)
    env = es_mod.make_env(config, training=False)
    returns = [play(policy, env, es_mod.derive_seed(1, es_mod.EVAL_ENV_STREAM, 0, e)) for e in range(3)]
    assert float(match.group(1)) == pytest.approx(np.mean(returns), abs=1e-3)


def test_init_from_starts_at_the_files_weights(tmp_path):
    run = train(tmp_path, "a", iters=2, env="LunarLander-v3")
    init = train(tmp_path, "b", "--init-from", str(run / "final.npz"), "--seed", "5", iters=1, env="LunarLander-v3")
    params, meta = es_mod.load_weights(str(run / "final.npz"))
    policy = es_mod.make_policy(meta["policy"], params, (meta["obs_norm"]["mean"], meta["obs_norm"]["std"]))
    env = es_mod.make_env(dict(meta["env"], max_episode_steps=50), training=True)
    center = play(policy, env, es_mod.derive_seed(5, es_mod.CENTER_ENV_STREAM, 0, 0))
    assert float(progress(init)[0]["center_return"]) == pytest.approx(center, rel=1e-4)
    line = assert_one_line_error(run_here(["--init-from", str(run / "final.npz"), "--hidden-sizes", "4"], cwd=tmp_path))
    assert "--hidden-sizes" in line


@pytest.mark.parametrize("env_id,extra", [
    ("LunarLander-v3", []),
    ("LunarLander-v3", ["--env-kwargs", "continuous=true"]),
    ("BipedalWalker-v3", []),
    ("CarRacing-v3", ["--frame-size", "48", "--frame-stack", "2"]),
])
def test_trains_on_the_issue_envs(tmp_path, env_id, extra):
    run = train(tmp_path, "e", *extra, env=env_id, workers=2)
    rows = progress(run)
    assert len(rows) == 2 and all(np.isfinite(float(r["return_mean"])) for r in rows)
    assert float(rows[-1]["param_norm"]) > 0


def test_carracing_early_stop_is_training_only():
    config, policy_config, dim = configs("--env-id", "CarRacing-v3", "--max-episode-steps", "120", "--frame-size", "48",
                                         "--frame-stack", "1", "--hidden-sizes", "8")
    shared = (np.zeros(dim, np.float32), np.zeros(0, np.float32), np.ones(0, np.float32))
    pool = rollout_pool(1, (config, policy_config), shared)  # all-zero weights: no gas,
    (_, train_steps, _), (_, eval_steps, _) = pool.map([es_mod.RolloutTask(0, 0, 0.0, [7], True), es_mod.RolloutTask(0, 0, 0.0, [7], False)], shared)
    assert train_steps < 60 and eval_steps == 120  # training: stopped after 20 negative rewards in a row


@pytest.mark.skipif(importlib.util.find_spec("ale_py") is None, reason="needs the Atari extra (ale-py)")
def test_pong_pixels_with_conv_lstm(tmp_path):
    run = train(tmp_path, "pong", "--recurrent", "--frame-size", "42", "--num-eval-rollouts", "1",
                env="ALE/Pong-v5", iters=1)
    assert len(progress(run)) == 1


@pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="needs gymnasium[mujoco]")
def test_halfcheetah(tmp_path):
    run = train(tmp_path, "cheetah", env="HalfCheetah-v5", iters=2)
    assert len(progress(run)) == 2


def test_capture_video(tmp_path):
    run = train(tmp_path, "v", "--capture-video", "--eval-every", "1", iters=1)
    videos = list((run / "videos").iterdir())
    assert [v.name.split(".")[0] for v in videos] == ["iter-00001"] and videos[0].stat().st_size > 1000
    out = run_script(["--from-pretrained", str(run / "final.npz"), "--num-eval-rollouts", "1", "--capture-video",
                      "--run-name", "eval"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "runs" / "eval" / "videos").glob("pretrained.*"))) == 1


# ------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing damaged
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv"),
    (["--population-size", "5"], "even"),
    (["--population-size", "1", "--no-antithetic"], "--population-size must be an integer >= 2"),
    (["--sigma", "0"], "--sigma"),
    (["--sigma", "-1"], "--sigma"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--num-workers", "0"], "--num-workers"),
    (["--env-kwargs", "continuous"], "KEY=VALUE"),
    (["--env-id", "FrozenLake-v1"], "observation space"),
    (["--from-pretrained", "missing.npz"], "does not exist"),
    (["--resume", "nowhere"], "no checkpoint"),
    (["--hidden-sizes", "1000000000000"], "<= 2147483647"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    line = assert_one_line_error(run_script(args + ["--max-iter", "1"], cwd=tmp_path))
    assert expected in line


BAD_FLAGS = [
    ["--sigma", "nan"], ["--sigma", "inf"], ["--sigma", "-0.1"], ["--learning-rate", "-inf"], ["--learning-rate", "x"],
    ["--momentum", "1"], ["--momentum", "-0.5"], ["--weight-decay", "-1"], ["--lr-decay", "0"], ["--lr-decay", "1.5"],
    ["--sigma-decay", "nan"], ["--lr-min", "-1e-9"], ["--sigma-min", "inf"], ["--population-size", "0"],
    ["--population-size", "2.5"], ["--population-size", "nan"], ["--population-size", "100000000000"],
    ["--num-rollouts", "3000000000"], ["--max-iter", "0"], ["--num-rollouts", "-2"],
    ["--num-eval-rollouts", "0"], ["--eval-every", "0"], ["--max-episode-steps", "0"], ["--max-negative-steps", "-1"],
    ["--hidden-sizes", "8", "0"], ["--hidden-sizes", "8.5"], ["--frame-size", "20"], ["--frame-stack", "0"],
    ["--seed", "-1"], ["--seed", "1e3"], ["--seed", str(2 ** 64)], ["--consecutive-goal-stopping", "0"],
    ["--reward-goal", "nan"], ["--reward-goal", "-inf"], ["--num-workers", "two"], ["--optimizer", "rmsprop"],
    ["--activation", "swish"], ["--fitness-shaping", "rank"], ["--env-kwargs", "=1"], ["--recurrent", "--hidden-sizes"],
    ["--env-id", "NoSuchEnv-v0"], ["--env-id", "ALE/NoSuchGame-v5"], ["--logs-dir", "a_file"],
    ["--logs-dir", "a_file/below"], ["--run-name", "a/b"], ["--run-name", ".."], ["--from-pretrained", "a_folder"],
    ["--from-pretrained", "missing.npz"], ["--init-from", "a_folder"], ["--init-from", "missing.npz"],
    ["--resume", "a_folder"], ["--resume", "missing.pkl"], ["--resume", "a_file"], ["--from-pretrained", "a_file"],
    ["--init-from", "a_file", "--resume", "a_folder"], ["--resume", "a_folder", "--env-id", "Acrobot-v1"],
]


def main_in_process(argv, capsys):
    """es_mod.main(argv) in this process: (exit code, the lines it wrote on stderr)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = es_mod.main(argv)
    finally:
        signal.signal(signal.SIGTERM, handler)  # main() installs its own
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=" ".join)
def test_every_bad_flag_value_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a checkpoint, weights file or folder")
    (tmp_path / "a_folder").mkdir()
    # the bad value last: a flag given twice takes its last value
    code, lines = main_in_process(["--max-iter", "1", "--num-workers", "1"] + argv, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("train_openai_es.py: error: "), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]  # nothing written


@pytest.mark.parametrize("state", [{"args": {}, "es": {}, "obs_stats": None, "counters": {}}, {"args": None},
                                   {"args": [], "es": 3, "obs_stats": "x", "counters": None}])
def test_an_incomplete_checkpoint_is_one_line(tmp_path, monkeypatch, capsys, state):
    (tmp_path / "checkpoint.pkl").write_bytes(pickle.dumps(dict(state, script=es_mod.SCRIPT, format_version=1)))
    monkeypatch.chdir(tmp_path)
    code, lines = main_in_process(["--resume", ".", "--num-workers", "1"], capsys)
    assert code == 2 and len(lines) == 1 and "not a complete" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pkl"]


@pytest.mark.parametrize("change", [
    {"script": "train_ga.py"}, {"format_version": 2}, {"env_id": "NoSuchEnv-v0"}, {"env_id": 3},
    {"policy": {"activation": "swish"}}, {"policy": {"hidden_sizes": [32, 0]}}, {"policy": {"hidden_sizes": ["32", 32]}},
    {"policy": {"hidden_sizes": [32.0, 32]}}, {"policy": {"recurrent": "yes"}}, {"policy": {"action_bounding": "wrap"}},
    {"policy": {"obs_norm": 1}}, {"env": {"frame_size": 3.5}}, {"env": {"frame_stack": 0}}, {"env": {"grayscale": None}},
    {"env": {"env_kwargs": ["continuous"]}}, {"obs_norm": {"mean": [0.0], "std": [1.0], "count": 5}},
    {"obs_norm": {"mean": [0.0] * 8, "std": [0.0] * 8, "count": 5}}, {"obs_norm": None}, {"policy": None},
    {"policy": {"num_actions": 7}}, "params-nan", "params-short", {"env": {"env_kwargs": {"gravity": float("nan")}}},
    {"policy": {"hidden_sizes": 32}}, {"env": {"grayscale": 1}}, {"policy": {"recurrent": True, "hidden_sizes": []}},
])
def test_a_weights_file_whose_meta_is_not_real_is_refused(tmp_path, monkeypatch, capsys, change):
    params, meta = es_mod.load_weights(os.path.join(ROOT, "pretrained", "openai_es_lunarlander.npz"))
    if change == "params-nan":
        params[3] = np.nan
    elif change == "params-short":
        params = params[:-1]
    else:
        for key, value in change.items():
            meta[key] = dict(meta[key], **value) if isinstance(value, dict) and key in ("env", "policy") else value
    np.savez(tmp_path / "bad.npz", params=params, meta=np.array(json.dumps(meta)))
    monkeypatch.chdir(tmp_path)
    for flag in ("--from-pretrained", "--init-from"):
        code, err = main_in_process([flag, "bad.npz", "--num-workers", "1", "--num-eval-rollouts", "1"], capsys)
        assert code == 2 and len(err) == 1 and "error: " in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_a_weights_file_with_env_kwargs_plays_with_them(tmp_path, monkeypatch, capsys):
    params, meta = es_mod.load_weights(os.path.join(ROOT, "pretrained", "openai_es_lunarlander.npz"))
    meta["env"]["env_kwargs"] = {"gravity": -9.0, "enable_wind": False}
    np.savez(tmp_path / "kwargs.npz", params=params, meta=np.array(json.dumps(meta)))
    assert es_mod.load_weights(str(tmp_path / "kwargs.npz"))[1]["env"]["env_kwargs"] == meta["env"]["env_kwargs"]
    monkeypatch.chdir(tmp_path)
    argv = ["--from-pretrained", "kwargs.npz", "--num-workers", "1", "--num-eval-rollouts", "1", "--max-episode-steps", "20"]
    code, err = main_in_process(argv, capsys)
    assert code == 0, err


def test_help_shows_each_default_once():
    out = run_script(["--help"], cwd=ROOT)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in ("--num-workers", "--antithetic", "--obs-norm", "--grayscale", "--max-episode-steps"):
        entry = text.split(flag, 2)[-1].split(" --", 1)[0]
        assert entry.count("(default") <= 1, entry
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    assert "(default: --antithetic)" in text and "(default: 256)" in text


def test_shipped_weights_files_still_load():
    params, meta = es_mod.load_weights(os.path.join(ROOT, "pretrained", "openai_es_lunarlander.npz"))
    assert params.dtype == np.float32 and meta["env_id"] == "LunarLander-v3"


def test_bad_weights_and_checkpoints(tmp_path, in_process):
    def run_script(args, cwd):  # the refused inputs in this process
        return in_process(es_mod, args, cwd)

    run = train(tmp_path, "ok", iters=1)  # a subprocess: the module-level run_script
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    params, meta = es_mod.load_weights(str(run / "final.npz"))
    np.savez(tmp_path / "short.npz", params=params[:-3], meta=np.array(json.dumps(meta)))
    assert "parameters" in assert_one_line_error(run_script(["--from-pretrained", "short.npz"], cwd=tmp_path))
    assert "parameters" in assert_one_line_error(run_here(["--init-from", "short.npz"], cwd=tmp_path))
    assert "LunarLander-v3" in assert_one_line_error(
        run_script(["--from-pretrained", str(run / "final.npz"), "--env-id", "LunarLander-v3"], cwd=tmp_path))
    if os.path.exists(AUTHORS_WEIGHTS):  # no meta: not this script's file
        assert "not a train_openai_es.py weights file" in assert_one_line_error(
            run_script(["--from-pretrained", AUTHORS_WEIGHTS], cwd=tmp_path))
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
    # Starting a new run in a folder that holds one would overwrite it: refused.
    assert "--resume" in assert_one_line_error(run_script(["--run-name", "ok", "--max-iter", "1"], cwd=tmp_path))
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Ray (--ray-address): the tests with a cluster skip where Ray is not installed
# ------------------------------------------------------------------------------------------------
def test_without_ray_the_flag_is_a_one_line_error_and_nothing_else_needs_ray(tmp_path):
    line = assert_one_line_error(run_without_ray(SCRIPT, ["--ray-address", "auto"], cwd=tmp_path))
    assert "--ray-address needs ray" in line and "requirements-ray.txt" in line
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:6379")  # honoured as Ray does
    assert "needs ray" in assert_one_line_error(run_without_ray(SCRIPT, ["--max-iter", "1"], cwd=tmp_path, env=env))
    assert not (tmp_path / "runs").exists()
    # No flag: the local pool, and Ray is never imported.
    out = run_without_ray(SCRIPT, ["--run-name", "local", "--num-workers", "2", "--max-iter", "1",
                                   "--hidden-sizes", "8", *TINY], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 worker processes" in out.stdout
    assert [row["num_cpus"] for row in progress(tmp_path / "runs" / "local", drop=())] == ["2"]


def test_run_chunk_builds_its_worker_once_and_reads_each_batchs_arrays():
    config, policy_config, dim = configs("--hidden-sizes", "8")
    rng = np.random.default_rng(0)
    thetas = [rng.normal(0, 0.5, dim).astype(np.float32) for _ in range(2)]
    stats = (np.zeros(4, np.float32), np.ones(4, np.float32))
    task = es_mod.RolloutTask(7, 1, 0.5, [3, 4], True)
    local = rollout_pool(1, (config, policy_config), (thetas[0], *stats))
    expected = [local.map([task], (theta, *stats))[0] for theta in thetas]
    assert expected[0][0] != expected[1][0]
    key = "test-pool"
    try:
        for i, theta in enumerate(thetas):
            for _ in range(2):
                batch = (es_mod.RolloutWorker, (config, policy_config), (theta, *stats))
                [(returns, steps, obs)] = es_mod.run_chunk(key, batch, [task])
                assert returns == expected[i][0] and steps == expected[i][1]
                np.testing.assert_array_equal(obs[1], expected[i][2][1])
            worker = es_mod.WORKERS[key]
        assert es_mod.WORKERS[key] is worker  # env and policy built once for the pool
    finally:
        es_mod.WORKERS.pop(key, None)


def test_ray_cluster_run_equals_the_local_pool_run(tmp_path, ray_cluster):
    local = train(tmp_path, "local", workers=2)
    out = run_script(["--env-id", "CartPole-v1", "--run-name", "ray", "--max-iter", "2", "--hidden-sizes", "8", *TINY,
                      "--ray-address", ray_cluster.address], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"Ray cluster at {ray_cluster.address} (2 CPUs on 1 node)" in out.stdout
    ray_run = tmp_path / "runs" / "ray"
    assert progress(ray_run, drop=("wall_time_s",)) == progress(local, drop=("wall_time_s",))
    assert {row["num_cpus"] for row in progress(ray_run, drop=())} == {"2"}
    # --num-workers caps the rollouts running at once; RAY_ADDRESS stands for the flag.
    out = run_script(["--env-id", "CartPole-v1", "--run-name", "capped", "--max-iter", "2", "--hidden-sizes", "8", *TINY,
                      "--num-workers", "1"], cwd=tmp_path, env=dict(os.environ, RAY_ADDRESS=ray_cluster.address))
    assert out.returncode == 0, out.stderr
    assert "at most 1 rollouts at once" in out.stdout
    assert progress(tmp_path / "runs" / "capped") == progress(local)
    assert {row["num_cpus"] for row in progress(tmp_path / "runs" / "capped", drop=())} == {"1"}
    # --from-pretrained evaluates on the cluster too, with the local pool's numbers.
    summaries = []
    for placement in (["--num-workers", "2"], ["--ray-address", ray_cluster.address]):
        out = run_script(["--from-pretrained", str(local / "final.npz"), "--num-eval-rollouts", "3", *placement],
                         cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        summaries.append(out.stdout.strip().splitlines()[-1])
    assert summaries[0] == summaries[1]


def test_ray_worker_killed_mid_run_costs_a_rerun_not_the_run(tmp_path, ray_cluster, rollout_killer):
    flags = ["--env-id", "BipedalWalker-v3", "--max-iter", "3", "--hidden-sizes", "8", *TINY,
             "--population-size", "8", "--max-episode-steps", "300", "--quiet"]
    killed, returncode, stderr = rollout_killer(
        [sys.executable, SCRIPT, "--run-name", "ray", "--ray-address", ray_cluster.address, *flags], tmp_path)
    assert killed is not None, "no rollout was running to be killed"
    assert returncode == 0, stderr
    local = run_script(["--run-name", "local", "--num-workers", "2", *flags], cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert progress(tmp_path / "runs" / "ray", drop=("wall_time_s",)) == progress(tmp_path / "runs" / "local",
                                                                                 drop=("wall_time_s",))


def test_ray_address_nobody_answers_is_a_one_line_error(tmp_path):
    pytest.importorskip("ray")
    line = assert_one_line_error(run_script(["--ray-address", f"127.0.0.1:{free_port()}"], cwd=tmp_path))
    assert "no Ray cluster answers" in line
    assert not (tmp_path / "runs").exists()


def test_losing_the_cluster_ends_with_a_message_and_the_run_resumes_locally(tmp_path):
    pytest.importorskip("ray")
    flags = ["--env-id", "CartPole-v1", "--hidden-sizes", "8", *TINY, "--eval-every", "1000"]
    cluster = RayCluster(num_cpus=2)
    try:
        proc = subprocess.Popen([sys.executable, SCRIPT, "--run-name", "lost", "--max-iter", "100000", *flags,
                                 "--ray-address", cluster.address, "--quiet"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run = tmp_path / "runs" / "lost"
        wait_until((run / "checkpoint.pkl").exists, "the run's first checkpoint", proc)
        time.sleep(1)
        cluster.kill_head()  # the head is lost mid-generation; this machine survives
    finally:
        cluster.stop()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if "train_openai_es.py" in line]
    assert lines, stderr
    assert "error: lost the Ray cluster" in lines[0] and "the checkpoint of generation" in lines[0]
    assert "resume with: python train_openai_es.py --resume runs/lost" in stderr
    generation = es_mod.load_checkpoint(str(run))[1]["es"]["generation"]
    assert generation >= 1 and len(progress(run)) >= generation
    # Resumed without --ray-address, on this machine: it continues exactly.
    out = run_script(["--resume", str(run), "--max-iter", str(generation + 2), "--num-workers", "2"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    straight = run_script(["--run-name", "straight", "--max-iter", str(generation + 2), *flags], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert progress(run) == progress(tmp_path / "runs" / "straight")


@pytest.mark.parametrize("activation", ["tanh", "relu", "selu"])
@pytest.mark.parametrize("discrete,bounding", [(True, "scale"), (False, "scale"), (False, "clip")])
def test_numpy_forward_of_the_mlp_matches_torch(activation, discrete, bounding):
    # act() runs the MLP of a vector observation in numpy; it must compute torch's forward, normalization included.
    policy = make_policy([6], 3, discrete, (16, 8), activation, action_bounding=bounding)
    rng = np.random.default_rng(0)
    policy.load(rng.normal(size=sum(p.numel() for p in policy.parameters())))
    policy.obs_mean = rng.normal(size=6).astype(np.float32)
    policy.obs_std = rng.uniform(0.5, 2, size=6).astype(np.float32)
    for _ in range(20):
        obs = rng.normal(scale=3, size=6).astype(np.float32)
        x = torch.from_numpy(((obs - policy.obs_mean) / policy.obs_std).clip(-5, 5))
        with torch.no_grad():
            want = policy(x)[0].numpy()
        action, _ = policy.act(obs)
        if discrete:
            assert action == int(want.argmax())
        else:
            assert action.dtype == np.float32 and np.allclose(action, want, atol=1e-5)
    # load() rebinds the weights: the numpy views must follow
    policy.load(np.zeros(sum(p.numel() for p in policy.parameters())))
    assert not np.any(es_mod.act_batch(policy, np.ones((1, 6), np.float32), policy.numpy_layers))


@pytest.mark.parametrize("activation", ["tanh", "relu", "selu"])
@pytest.mark.parametrize("obs_dim,hidden,actions,discrete", [(4, (64, 64), 2, True), (24, (40, 40), 4, False),
                                                              (8, (7,), 3, True), (3, (33, 5, 17), 1, False)])
def test_a_batched_forward_gives_each_member_exactly_its_own_action(activation, obs_dim, hidden, actions, discrete):
    # Lockstep rollouts step B members with one batched forward: row b must be bit for bit what member b's
    # weights give on its observation alone, or lockstep would change the episodes.
    policy = make_policy([obs_dim], actions, discrete, hidden, activation)
    rng = np.random.default_rng(obs_dim)
    genotypes = rng.normal(size=(13, sum(p.numel() for p in policy.parameters()))).astype(np.float32)
    policy.obs_mean = rng.normal(size=obs_dim).astype(np.float32)
    policy.obs_std = rng.uniform(0.5, 2, size=obs_dim).astype(np.float32)
    obs = rng.normal(scale=3, size=(13, obs_dim)).astype(np.float32)
    batched = es_mod.act_batch(policy, obs, es_mod.stacked_layers(policy, genotypes))
    for member in (0, 5, 12):
        alone, _ = policy.load(genotypes[member]).act(obs[member])
        assert alone == batched[member] if discrete else np.array_equal(alone, batched[member])
    subset = es_mod.act_batch(policy, obs[[3, 7]], es_mod.stacked_layers(policy, genotypes[[3, 7]]))
    assert (subset == [batched[3], batched[7]]) if discrete else np.array_equal(subset, batched[[3, 7]])


@pytest.mark.parametrize("env_id", ["CartPole-v1", "LunarLander-v3", "BipedalWalker-v3"])
def test_tasks_stepped_in_lockstep_give_what_each_gives_alone(env_id):
    # A worker steps a chunk's episodes together; each task's returns, steps and observation sums must be
    # those of the task run alone (members end at different steps, two episodes each, Box2D fresh envs).
    config, policy_config, dim = configs("--env-id", env_id, "--hidden-sizes", "8", "--max-episode-steps", "120")
    worker = es_mod.RolloutWorker(config, policy_config)
    theta = np.random.default_rng(1).normal(0, 0.5, dim).astype(np.float32)
    obs_dim = policy_config["obs_shape"][0]
    worker.use(theta, np.zeros(obs_dim, np.float32) + 0.1, np.ones(obs_dim, np.float32) * 2)
    Task = es_mod.RolloutTask
    tasks = [Task(seed, sign, 0.3, [100 + seed, 200 + seed], True) for seed in range(4) for sign in (1, -1)]
    tasks.append(Task(0, 0, 0.0, [7, 8], True))
    together = worker.run(tasks)
    alone = [worker.run([task])[0] for task in tasks]
    assert len({r[1] for r in together}) > 1  # the episodes do end at different steps
    for (returns, steps, sums), (returns_alone, steps_alone, sums_alone) in zip(together, alone):
        assert returns == returns_alone and steps == steps_alone
        assert sums[0] == sums_alone[0] and all(np.array_equal(a, b) for a, b in zip(sums[1:], sums_alone[1:]))
    evaluation = [Task(0, 0, 0.0, [e], False) for e in range(5)]
    assert worker.run(evaluation) == [worker.run([task])[0] for task in evaluation]


# ------------------------------------------------------------------------------------------------
# Issue 13: --exp-name, TensorBoard, --track, progress bars, --help, spawn, the Python API
# ------------------------------------------------------------------------------------------------
def scalars(run_dir):
    """{tag: [(step, value), ...]} of every TensorBoard event file in the run folder, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_exp_name_names_the_default_run_folder(tmp_path):
    out = run_script(["--exp-name", "baseline", "--max-iter", "1", "--seed", "7", "--hidden-sizes", "8", *TINY],
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run, = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"CartPole-v1__baseline__7__\d+", run.name), run.name
    assert json.loads((run / "args.json").read_text())["exp_name"] == "baseline"
    # --exp-name comes from the checkpoint
    out = run_here(["--resume", run, "--max-iter", "2", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0 and len(progress(run)) == 2, out.stderr
    assert es_mod.parse_args([])[0].exp_name == "train_openai_es"
    for bad in ("", "a/b", ".."):
        assert "--exp-name" in assert_one_line_error(run_here(["--exp-name", bad], cwd=tmp_path))
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]


def test_tensorboard_scalars_are_the_progress_csv_columns(tmp_path):
    run = train(tmp_path, "tb", "--eval-every", "2")
    acc, curves = scalars(run)
    rows = progress(run, drop=())
    assert set(curves) == set(rows[0]) - {"env_steps"}
    for tag, points in curves.items():
        expected = [(int(r["env_steps"]), float(r[tag])) for r in rows if r[tag] != ""]
        assert [step for step, _ in points] == [step for step, _ in expected], tag
        assert np.allclose([v for _, v in points], [v for _, v in expected], rtol=1e-6), tag
    assert len(curves["eval_return_mean"]) == 1  # generation 1 has no evaluation: no point
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("|param|value|\n|-|-|\n") and "|sigma|0.1|" in text


def test_tensorboard_curves_continue_on_resume_without_the_killed_sessions_points(tmp_path):
    run = train(tmp_path, "tb", iters=2)
    checkpoint = (run / "checkpoint.pkl").read_bytes()
    assert run_here(["--resume", str(run), "--max-iter", "3", "--num-workers", "1"], cwd=tmp_path).returncode == 0
    (run / "checkpoint.pkl").write_bytes(checkpoint)  # as if killed after generation 3's points, before its checkpoint
    out = run_here(["--resume", str(run), "--max-iter", "4", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    _, curves = scalars(run)
    rows = progress(run)
    assert [step for step, _ in curves["return_mean"]] == [int(r["env_steps"]) for r in rows]
    assert [value for _, value in curves["iteration"]] == [1, 2, 3, 4]
    assert len(list(run.glob("events.out.tfevents.*"))) == 3


def test_track_logs_to_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    run = train(tmp_path, "tracked", "--track", "--eval-every", "1", "--quiet", environ=env)
    files = {p.name for p in run.glob("wandb/offline-run-*/files/**/*")}
    assert {"best.npz", "final.npz", "learning_curve.png"} <= files
    records = b"".join(path.read_bytes() for path in run.glob("wandb/offline-run-*/run-*.wandb"))
    assert all(column.encode() in records for column in ("return_mean", "eval_return_mean", "center_rank", "env_steps"))
    assert not any(name.startswith("events.out.tfevents.") for name in files)  # logged, not synced (no copies)
    config = json.loads((run / "args.json").read_text())
    assert config["track"] and config["wandb_project_name"] == "neuroevolution" and config["wandb_id"]
    assert run.glob(f"wandb/offline-run-*-{config['wandb_id']}")  # the id a resume continues


def test_track_without_wandb_is_one_line(tmp_path):
    code = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, SCRIPT, "--track", "--max-iter", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    line = assert_one_line_error(out)
    assert out.returncode == 2 and "--track needs wandb: pip install -r requirements-track.txt" in line
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_on_a_terminal_only(tmp_path):
    command = [sys.executable, SCRIPT, "--run-name", "bar", "--max-iter", "2", "--num-workers", "2",
               "--hidden-sizes", "8", *TINY]
    code, text = run_on_terminal(command, cwd=tmp_path)
    assert code == 0, text
    assert "episode" in text and ("%|" in text or "/s" in text) and "generation 1" in text
    out = run_script(["--run-name", "piped", *command[4:]], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "%|" not in out.stdout + out.stderr and "episode/s" not in out.stdout + out.stderr
    assert len([line for line in out.stdout.splitlines() if line.startswith("iter ")]) == 2
    code, text = run_on_terminal([sys.executable, SCRIPT, "--from-pretrained", str(tmp_path / "runs" / "bar" /
                                  "final.npz"), "--num-eval-rollouts", "3", "--num-workers", "1"], cwd=tmp_path)
    assert code == 0 and "evaluation 0" in text and "episode" in text and "episode_return mean=" in text, text
    code, text = run_on_terminal(command[:3] + ["quiet", "--quiet", *command[4:]], cwd=tmp_path)
    assert code == 0 and "%|" not in text, text


def test_help_imports_no_heavy_module_and_shows_the_examples():
    heavy, text = modules_imported_by_help(SCRIPT)
    assert heavy == []
    assert "Examples:" in text and "--from-pretrained pretrained/openai_es_lunarlander.npz" in text
    assert 'More: README.md, section "train_openai_es.py"' in text
    assert "--sigma 0.1 --learning-rate 0.2 --reward-goal 500" in text  # the examples' lines kept as written


def test_runs_as_on_macos_spawn_and_no_sched_getaffinity(tmp_path, monkeypatch):
    out = run_as_on_macos(SCRIPT, ["--help"], cwd=tmp_path)
    assert out.returncode == 0 and "--num-workers" in out.stdout, out.stderr
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert es_mod.build_parser().parse_args([]).num_workers == os.cpu_count()
    args = ["--max-iter", "2", "--num-workers", "2", "--eval-every", "1", "--hidden-sizes", "8", *TINY]
    out = run_as_on_macos(SCRIPT, ["--run-name", "spawn", *args], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    forked = train(tmp_path, "fork", "--eval-every", "1", workers=2)
    assert progress(tmp_path / "runs" / "spawn") == progress(forked)


def test_python_api_on_a_fitness_of_your_own():
    from train_openai_es import OpenAIES

    def fitness(x):  # your own function of a vector, higher is better
        return -np.sum((x - 3.0) ** 2)

    es = OpenAIES(np.zeros(10), population_size=50, sigma=0.1, learning_rate=0.1)
    for generation in range(200):
        candidates = es.candidates()  # (50, 10) float32: the members of es.ask(), in its order
        es.tell([fitness(x) for x in candidates])
    assert fitness(np.zeros(10)) == -90 and fitness(es.theta) > -0.5
    assert np.allclose(es.candidates()[0], es_mod.perturb(es.theta, es.sigma, *es.ask()[0]))


def test_a_policy_too_large_for_memory_is_a_clear_error():
    # (2^31 - 1)^2 float32 weights, about 2^64 bytes: torch's allocator refuses them on any machine.
    config = dict(obs_shape=[2 ** 31 - 1], discrete=True, num_actions=2, hidden_sizes=[2 ** 31 - 1], activation="tanh")
    with pytest.raises(MemoryError, match="do not fit in"):
        es_mod.make_policy(dict(config, recurrent=False, action_bounding="scale", obs_norm=False))
