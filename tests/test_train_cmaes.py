"""Tests of train_cmaes.py: the AttentionAgent and its layout in-process, whole runs through subprocess."""

import csv
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import cma
import numpy as np
import pytest
import torch

import train_cmaes as cm
from conftest import modules_imported_by_help, run_as_on_macos, run_main, run_on_terminal, run_without_ray, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_cmaes.py")
AUTHORS = os.path.join(ROOT, "..", "shared", "weights", "attentionagent_carracing.npz")
needs_authors = pytest.mark.skipif(not os.path.exists(AUTHORS), reason="needs ../shared/weights")
TINY = ["--population-size", "4", "--num-rollouts", "1", "--max-episode-steps", "50", "--num-eval-rollouts", "1",
        "--eval-every", "1"]


def run_script(args, cwd, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_here(args, cwd):
    """run_script's result from main() in this process: no seconds of imports."""
    return run_main(cm, args, cwd)


def train(tmp_path, name, *extra, workers=1, iters=2):
    """A TINY run of `iters` generations; one worker runs in this process, two in worker processes."""
    args = ["--run-name", name, "--num-workers", str(workers), "--max-iter", str(iters), *TINY, *extra]
    if workers == 1:
        out = run_here(args, cwd=tmp_path)
    else:
        out = run_script(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    return tmp_path / "runs" / name, out


# Where a run ran (wall clock, CPUs) is not part of its result.
def progress(run_dir, drop=("wall_time_s", "num_cpus")):
    with open(run_dir / "progress.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def assert_one_line_error(out):
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout and "error" in lines[0]
    return lines[0]


def authors_params():
    with np.load(AUTHORS, allow_pickle=False) as data:
        return data["params"]


# ------------------------------------------------------------------------------------------------
# The agent
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,total,attention,controller", [
    ({}, 3667, 1184, 2483),
    ({"query_dim": 2, "bias": False}, 588 + 2483, 588, 2483),
    ({"controller": "rnn"}, 1184 + 659, 1184, 659),
    ({"controller": "mlp", "num_frames": 4}, 1184 + 1347, 1184, 1347),
])
def test_parameter_counts(kwargs, total, attention, controller):
    agent = cm.AttentionAgent(**kwargs)
    assert agent.get_flat().size == total
    assert agent.part_mask("attention").sum() == attention and agent.part_mask("controller").sum() == controller


@pytest.mark.skipif(not os.path.exists(AUTHORS), reason="needs ../shared/weights")
def test_flat_layout_matches_the_authors_file():
    params = authors_params()
    agent = cm.AttentionAgent()
    agent.set_flat(params)
    assert np.array_equal(agent.get_flat(), params)  # round trip
    # fc_q.bias (4), fc_q.weight (4x147), fc_k.bias, fc_k.weight, lstm.bias_hh, bias_ih, weight_hh, weight_ih, fc.bias, fc.weight
    assert np.array_equal(agent.fc_q.bias.numpy(), params[:4])
    assert np.array_equal(agent.fc_q.weight.numpy(), params[4:592].reshape(4, 147))
    assert np.array_equal(agent.fc_k.bias.numpy(), params[592:596])
    assert np.array_equal(agent.lstm.bias_hh_l0.numpy(), params[1184:1248])
    assert np.array_equal(agent.lstm.weight_ih_l0.numpy(), params[1184 + 128 + 1024:1184 + 128 + 1024 + 1280].reshape(64, 20))
    assert np.array_equal(agent.fc.bias.numpy(), params[-51:-48])
    assert np.array_equal(agent.fc.weight.numpy(), params[-48:].reshape(3, 16))
    with pytest.raises(ValueError):
        agent.set_flat(params[:-1])


def test_patches_attention_and_top_k_follow_the_paper():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    agent = cm.AttentionAgent()
    with torch.no_grad():
        for p in agent.parameters():
            p.copy_(torch.randn_like(p))
    patches = agent.patches(frame).numpy()
    assert patches.shape == (529, 147)
    for index in (0, 22, 23, 300, 528):  # row-major patches, each flattened as (row, col, channel)
        r, c = divmod(index, 23)
        assert np.allclose(patches[index], frame[4 * r:4 * r + 7, 4 * c:4 * c + 7].reshape(-1) / 255.0)
    q = patches @ agent.fc_q.weight.numpy().T + agent.fc_q.bias.numpy()
    k = patches @ agent.fc_k.weight.numpy().T + agent.fc_k.bias.numpy()
    logits = q @ k.T / np.sqrt(147)
    attention = np.exp(logits - logits.max(axis=1, keepdims=True))
    attention /= attention.sum(axis=1, keepdims=True)
    expected = np.argsort(-attention.sum(axis=0), kind="stable")[:10]
    assert np.array_equal(agent.attend(frame).numpy(), expected)
    # The controller sees the top patches' centers (row, col) / 96, most important first.
    seen = []
    agent.lstm.forward = lambda x, state: (seen.append(x.clone()) or torch.zeros(1, 16), state)
    action, _, top = agent(frame, None)
    centers = np.array([[3 + 4 * (i // 23), 3 + 4 * (i % 23)] for i in expected]) / 96
    assert np.allclose(seen[0].numpy().reshape(10, 2), centers)
    assert action.shape == (3,) and np.all(np.abs(action) <= 1)


def test_controllers_keep_state_across_steps():
    frame = np.random.default_rng(1).integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    for controller in ("lstm", "rnn", "mlp"):
        torch.manual_seed(0)
        agent = cm.AttentionAgent(controller=controller)
        with torch.no_grad():
            for p in agent.parameters():
                p.mul_(3)
        state = agent.initial_state()
        first, state, _ = agent(frame, state)
        second, state, _ = agent(frame, state)
        assert not np.allclose(first, second), controller  # same frame, different memory


def test_attention_frame_highlights_the_top_patches():
    frame = np.full((96, 96, 3), 200, dtype=np.uint8)
    agent = cm.AttentionAgent()
    image = cm.attention_frame(frame, torch.tensor([0, 528]), agent, scale=2)
    assert image.shape == (192, 2 * 192 + 2, 3)
    left, right = image[:, :192], image[:, 194:]
    assert np.all(left == 200)
    assert right[100, 100].tolist() == [70, 70, 70]  # dimmed away from the patches
    assert right[4, 4].tolist() == [200, 200, 200]  # inside the first patch: raw
    assert right[0, 0].tolist() == [255, 0, 0]  # its outline, red for the most important


@needs_authors
def test_authors_weights_drive_better_than_a_random_agent():
    config = {"env_id": "CarRacing-v3", "max_episode_steps": 150, "max_negative_steps": 0, "stock_env": False}
    env = cm.make_env(config, training=False)
    authors = cm.AttentionAgent()
    authors.set_flat(authors_params())
    torch.manual_seed(0)
    random_agent = cm.AttentionAgent()
    trained = cm.rollout(env, authors, seed=3)[0]
    untrained = cm.rollout(env, random_agent, seed=3)[0]
    assert trained > untrained + 20, (trained, untrained)


# ------------------------------------------------------------------------------------------------
# Whole runs
# ------------------------------------------------------------------------------------------------
def test_tiny_run_resumes_exactly_and_writes_nothing_outside_its_folder(tmp_path):
    straight, out = train(tmp_path, "straight", "--eval-every", "2", iters=5)
    assert "CMA-ES searches: 3667" in out.stdout
    for name in ("args.json", "progress.csv", "learning_curve.png", "checkpoint.pkl", "best.npz", "final.npz"):
        assert (straight / name).exists(), name
    # stopped at generation 3, off the evaluation schedule: that run's final evaluation stays out of the record
    split, _ = train(tmp_path, "split", "--eval-every", "2", iters=3)
    assert cm.load_weights(str(split / "final.npz"))[2]["evaluation"]["episodes"] == 1
    out = run_here(["--resume", str(split), "--max-iter", "5", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert progress(straight) == progress(split) and len(progress(split)) == 5
    assert [r["eval_return_mean"] != "" for r in progress(split)] == [False, True, False, True, False]
    assert np.array_equal(np.load(straight / "final.npz")["params"], np.load(split / "final.npz")["params"])
    header = list(progress(straight)[0])
    assert header[:3] == ["iteration", "evaluations", "env_steps"] and "sigma" in header
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # no outcmaes/ in the current directory
    assert sorted(os.listdir(tmp_path / "runs")) == ["split", "straight"]


def meta_of(path):
    return cm.load_weights(str(path))[2]


def test_mean_npz_holds_each_generations_mean_and_sigma_and_a_restart_continues_from_it(tmp_path):
    lost, _ = train(tmp_path, "lost", iters=3)
    with open(lost / "checkpoint.pkl", "rb") as f:
        es = pickle.load(f)["cma"]
    mean = meta_of(lost / "mean.npz")
    assert mean["iteration"] == 3 and mean["sigma"] == es.sigma and mean["sigma"] != 0.1
    assert np.array_equal(np.load(lost / "mean.npz")["params"], es.result.xfavorite.astype(np.float32))
    assert mean["env_steps"] == int(progress(lost)[-1]["env_steps"])
    assert [segment["start"] for segment in mean["provenance"]] == ["new"] and mean["provenance"][0]["from"] is None
    # No generation left to run: final.npz is the restart's first distribution, the file's mean and sigma.
    same, out = train(tmp_path, "same", "--restart-from", str(lost / "mean.npz"), iters=3)
    assert "restarting at generation 3" in out.stdout and progress(same) == []  # progress.csv: its header alone
    assert np.array_equal(np.load(same / "final.npz")["params"], np.load(lost / "mean.npz")["params"])
    assert meta_of(same / "final.npz")["sigma"] == mean["sigma"]
    # Two generations more: the rows go on from generation 4 and the env steps from the file's count.
    restarted, _ = train(tmp_path, "restarted", "--restart-from", str(lost / "mean.npz"), iters=5)
    rows = progress(restarted)
    assert [row["iteration"] for row in rows] == ["4", "5"] and float(rows[0]["sigma"]) == pytest.approx(mean["sigma"], rel=1e-5)
    assert int(rows[0]["env_steps"]) > mean["env_steps"]
    with open(restarted / "checkpoint.pkl", "rb") as f:
        assert pickle.load(f)["cma"].countiter == 2  # a fresh CMA-ES: its own count, not the file's generation
    with open(restarted / "args.json") as f:
        assert json.load(f)["init_sigma"] == mean["sigma"]
    provenance = meta_of(restarted / "final.npz")["provenance"]
    assert [(s["start"], s["iteration"], s["from"]) for s in provenance] == [("new", 0, None), ("restart", 3, "mean.npz")]
    assert provenance[1]["sigma"] == mean["sigma"] and provenance[1]["population_size"] == 4
    # --init-sigma overrides the file's step size (a file written before sigma was recorded needs it).
    chosen, _ = train(tmp_path, "chosen", "--restart-from", str(lost / "mean.npz"), "--init-sigma", "0.05", iters=4)
    assert float(progress(chosen)[0]["sigma"]) == 0.05


def test_a_resume_may_change_the_episodes_per_member_and_the_provenance_lists_it(tmp_path):
    run, _ = train(tmp_path, "run", iters=2)
    out = run_here(["--resume", str(run), "--max-iter", "4", "--num-workers", "1", "--num-rollouts", "3"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with open(run / "args.json") as f:
        assert json.load(f)["num_rollouts"] == 3
    provenance = meta_of(run / "final.npz")["provenance"]
    assert [(s["start"], s["iteration"], s["num_rollouts"]) for s in provenance] == [("new", 0, 1), ("resume", 2, 3)]
    one, _ = train(tmp_path, "one", iters=4)
    rows, ones = progress(run), progress(one)
    assert rows[:2] == ones[:2] and rows[2] != ones[2]  # generations 3-4: other fitness, three tracks each
    out = run_here(["--resume", str(run), "--max-iter", "5", "--population-size", "8"], cwd=tmp_path)
    assert out.returncode == 2 and "--population-size cannot be changed on resume" in out.stderr


def worker_pids(pid):
    """Live (not zombie) child processes of `pid`, read from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(parent) == pid and state != "Z":
            found.append(int(entry))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_run(tmp_path, name, *extra):
    """A run with 2 worker processes, started in the background once its workers are up: (process, workers)."""
    proc = subprocess.Popen([sys.executable, SCRIPT, "--run-name", name, "--num-workers", "2", *TINY, *extra],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(worker_pids(proc.pid)) >= 2, "the run's 2 worker processes", proc)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2, proc.communicate()
    return proc, workers


def test_one_and_two_workers_give_the_same_run_and_a_killed_worker_costs_a_rerun(tmp_path):
    one, _ = train(tmp_path, "w1", workers=1)
    proc, workers = start_run(tmp_path, "w2", "--max-iter", "2")
    os.kill(workers[0], signal.SIGKILL)  # mid-rollout or between batches: the batch is re-run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "restarting the workers and re-running this batch" in stdout
    assert progress(one) == progress(tmp_path / "runs" / "w2")


def test_pool_is_the_same_in_process_and_in_workers_and_gives_up_on_dying_workers(monkeypatch, capsys):
    env_config = {"env_id": "CarRacing-v3", "max_episode_steps": 15, "max_negative_steps": 0, "stock_env": False}
    agent_config = {"image_size": 96, "action_dim": 3, **{k: getattr(cm.parse_args([])[0], k) for k in cm.AGENT_FLAGS}}
    torch.manual_seed(0)
    params = cm.AttentionAgent(**agent_config).get_flat()
    shared, tasks = [np.stack([params, 3 * params])], [cm.RolloutTask(i % 2, [i], False) for i in range(4)]
    worker_args = (env_config, agent_config, params.size)
    expected = cm.RolloutPool(1, None, cm.RolloutWorker, worker_args, [2 * params.size]).map(tasks, shared)
    pool = cm.RolloutPool(2, None, cm.RolloutWorker, worker_args, [2 * params.size])
    try:
        assert pool.map(tasks, shared) == expected and expected[0] != expected[1]
        os.kill(next(iter(pool.executor._processes)), signal.SIGKILL)
        assert pool.map(tasks, shared) == expected
        assert "restarting the workers" in capsys.readouterr().out
        monkeypatch.setattr(cm, "WORKER_TRIES", 1)
        os.kill(next(iter(pool.executor._processes)), signal.SIGKILL)
        with pytest.raises(cm.PoolLost, match="keep dying"):
            pool.map(tasks, shared)
    finally:
        pool.close()


def test_workers_do_not_outlive_a_killed_driver(tmp_path):
    proc, workers = start_run(tmp_path, "orphans", "--max-iter", "1000", "--max-episode-steps", "1000")
    time.sleep(1)  # the workers are driving
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 5
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)), "a worker outlived its driver by 5 s"


def test_sigterm_keeps_the_checkpoint_prints_the_resume_command_and_stops_the_workers(tmp_path):
    proc, workers = start_run(tmp_path, "term", "--max-iter", "1000")
    run = tmp_path / "runs" / "term"
    wait_until((run / "checkpoint.pkl").exists, "the run's first checkpoint", proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resume with: python train_cmaes.py --resume runs/term" in stderr
    assert not any(map(alive, workers))
    done = len(progress(run))
    out = run_script(["--resume", str(run), "--max-iter", str(done + 1), "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(progress(run)) == done + 1


@needs_authors
@pytest.mark.parametrize("part,searched", [("controller", 2483), ("attention", 1184)])
def test_frozen_parts_stay_frozen_also_on_resume(tmp_path, part, searched):
    run, out = train(tmp_path, part, "--train", part, "--init-from", AUTHORS, iters=1)
    assert f"CMA-ES searches: {searched} ({part})" in out.stdout
    frozen = cm.AttentionAgent().part_mask("attention" if part == "controller" else "controller")
    authors = authors_params()
    params = np.load(run / "final.npz")["params"]
    assert np.array_equal(params[frozen], authors[frozen])
    assert not np.array_equal(params[~frozen], authors[~frozen])
    if part == "attention":  # a resumed run takes its frozen part from the file again: it continues exactly
        out = run_here(["--resume", str(run), "--max-iter", "2", "--num-workers", "1"], cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        straight, _ = train(tmp_path, "straight", "--train", part, "--init-from", AUTHORS, iters=2)
        assert progress(run) == progress(straight)
        assert np.array_equal(np.load(run / "final.npz")["params"], np.load(straight / "final.npz")["params"])


@needs_authors
def test_attention_only_with_a_smaller_query(tmp_path):
    run, out = train(tmp_path, "q2", "--train", "attention", "--init-from", AUTHORS, "--query-dim", "2",
                     "--no-bias", iters=1)
    assert "CMA-ES searches: 588 (attention)" in out.stdout
    params = np.load(run / "final.npz")["params"]
    assert params.size == 588 + 2483 and np.array_equal(params[588:], authors_params()[1184:])


@needs_authors
def test_init_from_a_file_of_another_controller_starts_searched_parts_fresh_and_frozen_ones_must_fit():
    authors = authors_params()
    for flags in (["--controller", "rnn"], ["--train", "controller", "--controller", "rnn"]):
        agent, _ = cm.build_agent(cm.parse_args([*flags, "--init-from", AUTHORS])[0], (96, 3))
        params = agent.get_flat()  # the authors' attention and output layer fc (51 values), a fresh (seeded) RNN
        assert params.size == 1184 + 659 and np.array_equal(params[:1184], authors[:1184])
        assert np.array_equal(params[-51:], authors[-51:])
    torch.manual_seed(1)
    assert np.array_equal(params[1184:-51], cm.AttentionAgent(controller="rnn").get_flat()[1184:-51])
    for flags, part in ((["--train", "attention", "--controller", "rnn"], "controller"),
                        (["--train", "controller", "--query-dim", "2"], "attention")):
        with pytest.raises(cm.UserError, match=f"cannot provide the {part}"):
            cm.build_agent(cm.parse_args([*flags, "--init-from", AUTHORS])[0], (96, 3))


@needs_authors
@pytest.mark.parametrize("part", ["attention", "controller"])
def test_fresh_starts_the_searched_part_from_the_seed_and_takes_only_the_frozen_part_from_the_file(part):
    authors, searched = authors_params(), cm.AttentionAgent().part_mask(part)
    for seed in (1, 7):
        args = cm.parse_args(["--train", part, "--fresh", "--init-from", AUTHORS, "--seed", str(seed)])[0]
        params = cm.build_agent(args, (96, 3))[0].get_flat()
        torch.manual_seed(seed)
        fresh = cm.AttentionAgent().get_flat()
        assert np.array_equal(params[~searched], authors[~searched])
        assert np.array_equal(params[searched], fresh[searched])
    without = cm.build_agent(cm.parse_args(["--train", part, "--init-from", AUTHORS])[0], (96, 3))[0].get_flat()
    assert np.array_equal(without, authors)  # without --fresh the file provides both parts


def test_train_a_part_without_init_from_freezes_the_other_at_fresh_weights(tmp_path):
    run, out = train(tmp_path, "staged", "--train", "controller", "--seed", "3", iters=1)
    assert "CMA-ES searches: 2483 (controller)" in out.stdout
    torch.manual_seed(3)
    fresh, attention = cm.AttentionAgent().get_flat(), cm.AttentionAgent().part_mask("attention")
    params = np.load(run / "final.npz")["params"]
    assert np.array_equal(params[attention], fresh[attention])
    assert not np.array_equal(params[~attention], fresh[~attention])


def test_separable_keeps_a_diagonal_covariance_for_its_generations_then_learns_the_full_one():
    for separable, diagonal_generations in ((0, 0), (3, 3)):
        es, _ = cm.make_cma(np.zeros(6), population_size=8, separable=separable)
        diagonal = []
        for _ in range(5):
            x = es.ask()
            es.tell(x, [float((v[0] + v[1]) ** 2 + v[2:] @ v[2:]) for v in x])
            diagonal.append(np.ndim(es.C) < 2)  # pycma keeps no n x n matrix while separable
        assert diagonal == [True] * diagonal_generations + [False] * (5 - diagonal_generations)


def test_separable_run_and_a_checkpoint_without_the_flags_added_since_resume_exactly(tmp_path):
    run, _ = train(tmp_path, "sep", "--separable", "100", iters=1)
    straight, _ = train(tmp_path, "sep_straight", "--separable", "100", iters=2)
    checkpoint = pickle.loads((run / "checkpoint.pkl").read_bytes())
    assert checkpoint["args"]["separable"] == 100
    del checkpoint["args"]["fresh"]  # as a checkpoint of a version before --fresh writes it
    (run / "checkpoint.pkl").write_bytes(pickle.dumps(checkpoint))
    out = run_here(["--resume", str(run), "--max-iter", "2", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert progress(run) == progress(straight)
    assert json.loads((run / "args.json").read_text())["fresh"] is False


@needs_authors
def test_from_pretrained_authors_file_and_attention_video(tmp_path):
    out = run_script(["--from-pretrained", AUTHORS, "--num-eval-rollouts", "2", "--max-episode-steps", "60",
                      "--num-workers", "2", "--capture-video", "--run-name", "v"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"episode_return mean=\S+ std=\S+ min=\S+ max=\S+ episodes=2",
                        out.stdout.strip().splitlines()[-1])
    videos = list((tmp_path / "runs" / "v" / "videos").iterdir())
    assert len(videos) == 1 and videos[0].stem == "pretrained" and videos[0].stat().st_size > 10_000


def test_from_pretrained_round_trip_of_a_trained_file(tmp_path):
    run, _ = train(tmp_path, "t", "--controller", "rnn", iters=1)
    out = run_script(["--from-pretrained", str(run / "final.npz"), "--num-eval-rollouts", "1",
                      "--max-episode-steps", "40"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    params, agent_config, meta = cm.load_weights(str(run / "final.npz"))
    assert agent_config["controller"] == "rnn" and meta["iteration"] == 1
    agent = cm.AttentionAgent(**agent_config)
    agent.set_flat(params)
    env = cm.make_env({"env_id": "CarRacing-v3", "max_episode_steps": 40, "max_negative_steps": 0, "stock_env": False}, training=False)
    expected = cm.rollout(env, agent, cm.derive_seed(1, cm.EVAL_ENV_STREAM, 0, 0))[0]
    assert f"mean={expected:.4f}" in out.stdout


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def weights_file(path, **changes):
    """A train_cmaes.py weights file of the paper's agent, its meta changed by `changes` (agent.* for the agent)."""
    agent = {"image_size": 96, "action_dim": 3, "patch_size": 7, "patch_stride": 4, "query_dim": 4, "top_k": 10,
             "hidden_size": 16, "bias": True, "controller": "lstm", "num_frames": 4}
    meta = {"format_version": 1, "script": "train_cmaes.py", "env_id": "CarRacing-v3", "agent": agent}
    for key, value in changes.items():
        (agent if key.startswith("agent_") else meta)[key.removeprefix("agent_")] = value
    np.savez(path, params=np.zeros(3667, np.float32), meta=np.array(json.dumps(meta)))


BAD_INPUTS = [  # (flags, a word the error line must hold)
    *[([flag, value], flag) for flag, values in {
        "--population-size": ["1", "0", "-4"], "--init-sigma": ["0", "-0.1", "nan", "inf", "-inf"],
        "--reward-goal": ["nan", "inf"], "--num-workers": ["0", "-1"], "--max-iter": ["0"], "--num-rollouts": ["0"],
        "--num-eval-rollouts": ["0"], "--eval-every": ["0"], "--max-episode-steps": ["0", "-5"],
        "--max-negative-steps": ["-1"], "--consecutive-goal-stopping": ["0"], "--seed": ["-1", str(2**70)],
        "--top-k": ["0", "530"], "--patch-size": ["0", "97"], "--patch-stride": ["0", "200"], "--hidden-size": ["0"],
        "--query-dim": ["-2"], "--num-frames": ["0"], "--logs-dir": ["a_file", "a_file/below"],
        "--run-name": ["", "../elsewhere", "a/b", "nul\0byte"], "--exp-name": ["", "a/b", ".."],
        "--resume": ["missing", "a_folder", "a_file_dir"],
        "--from-pretrained": ["missing.npz", "a_folder"], "--init-from": ["a_folder", "missing.npz"],
        "--restart-from": ["missing.npz", "a_folder"],
    }.items() for value in values],
    (["--restart-from", "restart.npz", "--top-k", "5"], "--top-k"), (["--restart-from", "size.npz"], "hidden_size"),
    (["--restart-from", "restart.npz", "--resume", "a_folder"], "exclude each other"),
    (["--restart-from", "restart.npz", "--init-from", "restart.npz"], "exclude each other"),
    (["--restart-from", "short.npz"], "3667"), (["--restart-from", "topk.npz"], "top_k"),
    (["--restart-from", "noiter.npz"], "no generation"), (["--restart-from", "floatiter.npz"], "no generation"),
    (["--restart-from", "booliter.npz"], "iteration"), (["--restart-from", "nosigma.npz"], "--init-sigma"),
    (["--restart-from", "badsigma.npz"], "sigma"), (["--restart-from", "nansigma.npz"], "sigma"),
    (["--restart-from", "badsteps.npz"], "env_steps"), (["--restart-from", "badprov.npz"], "provenance"),
    (["--restart-from", "badtrain.npz"], "train"),
    (["--top-k", "100", "--patch-stride", "20"], "--top-k"),
    (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv"), (["--env-id", "CartPole-v1"], "observation space"),
    (["--from-pretrained", "env.npz"], "NoSuchEnv"), (["--from-pretrained", "controller.npz"], "controller"),
    (["--from-pretrained", "size.npz"], "hidden_size"), (["--from-pretrained", "topk.npz"], "top_k"),
    (["--init-from", "script.npz"], "train_ga.py"), (["--from-pretrained", "agent.npz"], "agent"),
    (["--from-pretrained", "bias.npz"], "bias"), (["--init-from", "float.npz"], "patch_size"),
    (["--from-pretrained", "short.npz"], "3667"), (["--from-pretrained", "es.npz"], "train_openai_es.py"),
    (["--init-from", "es.npz"], "train_openai_es.py"), (["--fresh"], "--fresh"),
    (["--fresh", "--train", "controller"], "--fresh"), (["--fresh", "--init-from", "short.npz"], "--fresh"),
    *([(["--train", "attention", "--init-from", AUTHORS, "--controller", "rnn"], "controller"),
       (["--from-pretrained", AUTHORS, "--top-k", "5"], "--top-k"),
       (["--restart-from", AUTHORS], "--init-from")] if os.path.exists(AUTHORS) else []),
]


@pytest.mark.parametrize("flags,expected", BAD_INPUTS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, flags, expected):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file_dir").mkdir()
    (tmp_path / "a_file_dir" / "checkpoint.pkl").mkdir()
    for name, changes in {"env": {"env_id": "NoSuchEnv-v0"}, "controller": {"agent_controller": "gru"},
                          "size": {"agent_hidden_size": -16}, "topk": {"agent_top_k": 1000},
                          "script": {"script": "train_ga.py"}, "agent": {"agent": [1, 2]},
                          "bias": {"agent_bias": "yes"}, "float": {"agent_patch_size": 7.5},
                          "restart": {"iteration": 5, "sigma": 0.1}, "noiter": {"sigma": 0.1},
                          "floatiter": {"iteration": 5.0, "sigma": 0.1}, "booliter": {"iteration": True, "sigma": 0.1},
                          "nosigma": {"iteration": 5}, "badsigma": {"iteration": 5, "sigma": -0.1},
                          "nansigma": {"iteration": 5, "sigma": float("nan")},
                          "badsteps": {"iteration": 5, "sigma": 0.1, "env_steps": -3},
                          "badprov": {"iteration": 5, "sigma": 0.1, "provenance": "resumed"},
                          "badtrain": {"iteration": 5, "sigma": 0.1, "train": "lstm"}}.items():
        weights_file(tmp_path / f"{name}.npz", **changes)
    np.savez(tmp_path / "short.npz", params=np.zeros(100, np.float32))
    es_meta = {"format_version": 1, "script": "train_openai_es.py", "env_id": "CarRacing-v3"}
    np.savez(tmp_path / "es.npz", params=np.zeros(3667, np.float32), meta=np.array(json.dumps(es_meta)))
    before = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main() would install its handlers in pytest
    try:
        code = cm.main(["--num-workers", "1", "--max-iter", "1", "--num-eval-rollouts", "1", *flags])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("train_cmaes.py: error: ") and expected in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no run folder, nothing else written


def test_help_imports_no_heavy_module_and_shows_the_examples_and_the_readme():
    heavy, text = modules_imported_by_help(SCRIPT)
    assert heavy in ([], ["tqdm"]), heavy
    assert "python train_cmaes.py --train controller --init-from" in text and "Examples:" in text
    assert 'More: README.md, section "train_cmaes.py"' in text and "--exp-name" in text and "--track" in text


def test_num_workers_default_without_sched_getaffinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    assert cm.build_parser().parse_args([]).num_workers == os.cpu_count()


def test_help_shows_each_default_once():
    text = " ".join(cm.build_parser().format_help().split())
    assert "(default: usable cores)" in text and "(default: 2)" not in text.split("--num-workers")[1][:400]
    assert "(default" not in text.split("--no-bias")[1].split("--controller")[0]
    assert "(default: 256)" in text and "(default: CarRacing-v3)" in text


def test_crafted_checkpoints_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "system.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    assert "os.system" in assert_one_line_error(run_here(["--resume", "system.pkl"], cwd=tmp_path))
    # pycma evaluates option strings in its constructor: a pickle may rebuild cma objects from
    # their state, but calling a cma class (or anything but numpy's constructors) is refused.
    class CallsCma:
        def __reduce__(self):
            return cma.CMAEvolutionStrategy, ([0.0, 0.0], 1.0, {"popsize": f"__import__('os').system('touch {marker}')"})

    (tmp_path / "cma.pkl").write_bytes(pickle.dumps({"script": "train_cmaes.py", "cma": CallsCma()}))
    line = assert_one_line_error(run_here(["--resume", "cma.pkl"], cwd=tmp_path))
    assert "refusing" in line and "calls CMAEvolutionStrategy" in line
    assert not marker.exists()
    (tmp_path / "foreign.pkl").write_bytes(pickle.dumps({"script": "train_ga.py", "format_version": 1}))
    assert "train_ga.py" in assert_one_line_error(run_here(["--resume", "foreign.pkl"], cwd=tmp_path))
    (tmp_path / "partial.pkl").write_bytes(pickle.dumps({"script": "train_cmaes.py", "format_version": 1}))
    assert "not a complete" in assert_one_line_error(run_here(["--resume", "partial.pkl"], cwd=tmp_path))
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x05junk")
    assert "checkpoint" in assert_one_line_error(run_here(["--resume", "junk.pkl"], cwd=tmp_path))


# ------------------------------------------------------------------------------------------------
# The fast CarRacing: the same frames, bit for bit
# ------------------------------------------------------------------------------------------------
def car_env(stock, steps):
    return cm.make_env({"env_id": "CarRacing-v3", "max_episode_steps": steps, "max_negative_steps": 0,
                        "stock_env": stock}, training=False)


def trajectory(env, seed, policy):
    """Every (observation, reward, terminated, truncated) of one episode, driven by policy(step, obs)."""
    obs, _ = env.reset(seed=seed)
    out, step = [(obs, None, None, None)], 0
    while True:
        obs, reward, terminated, truncated, _ = env.step(policy(step, obs))
        out.append((obs, reward, terminated, truncated))
        step += 1
        if terminated or truncated:
            return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (obs_a, *rest_a), (obs_b, *rest_b) in zip(a, b):
        assert np.array_equal(obs_a, obs_b) and rest_a == rest_b


def test_gymnasium_carracing_is_the_version_fastcarracing_was_written_for():
    # FastCarRacing overrides gymnasium's frame drawing. If this fails, gymnasium's CarRacing changed:
    # compare its new _render/_render_road with FastCarRacing's, update them, then these hashes.
    import hashlib
    import inspect
    import gymnasium
    from gymnasium.envs.box2d import car_racing
    assert gymnasium.__version__ == "1.4.0"
    expected = {"_render": "55de32c78669c2be", "_render_road": "ececdf992df950f9",
                "_draw_colored_polygon": "8ab3784d359ee557", "_create_image_array": "8cbafdbd60c14d2f"}
    for name, digest in expected.items():
        source = inspect.getsource(getattr(car_racing.CarRacing, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, f"gymnasium's CarRacing.{name} changed"


def test_fast_env_gives_the_stock_frames_rewards_and_ends():
    stock, fast = car_env(True, 250), car_env(False, 250)
    assert type(stock.unwrapped).__name__ == "CarRacing" and isinstance(fast.unwrapped, cm.FastCarRacing)
    rng = np.random.default_rng(0)
    actions = rng.uniform([-1, -1, -1], [1, 1, 1], size=(250, 3)).astype(np.float32)
    scripted = [  # straight on the track (tiles change color), a hard turn off it, braking on the grass
        lambda step, obs: np.array([0.0, 0.2, -1.0], np.float32) if step < 120 else np.array([1.0, 1.0, -1.0], np.float32),
        lambda step, obs: actions[step],
        lambda step, obs: np.array([np.sin(step / 10), 0.5, 0.5 if step > 200 else -1.0], np.float32),
    ]
    for seed, policy in zip((3, 4, 5), scripted):  # several tracks on the same two env objects
        a = trajectory(stock, seed, policy)
        assert_same(a, trajectory(fast, seed, policy))
        assert a[-1][3] and len({r for _, r, _, _ in a[1:]}) > 2  # truncated at 250 steps; tiles were scored


@pytest.mark.skipif(not os.path.exists(AUTHORS), reason="needs ../shared/weights")
def test_agent_acts_identically_on_both_envs():
    agent = cm.AttentionAgent()
    agent.set_flat(authors_params())
    runs = []
    for stock in (True, False):
        actions = []
        env = car_env(stock, 200)
        state = agent.initial_state()

        def policy(step, obs):
            nonlocal state
            action, state, _ = agent(obs, state)
            actions.append(action)
            return action

        with torch.inference_mode():
            returns = sum(r for _, r, _, _ in trajectory(env, 8, policy)[1:])
        runs.append((np.array(actions), returns))
    assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_fast_env_draws_the_stock_frame_from_any_pose():
    # The culling (bounding circles, then the vertices) against the stock drawing, wherever the car is: on
    # and off the track, near the playfield's edge, any heading, and while the first second zooms in.
    stock, fast = car_env(True, 10).unwrapped, car_env(False, 10).unwrapped
    rng = np.random.default_rng(7)
    for trial in range(40):
        for env in (stock, fast):
            env.reset(seed=trial % 4)
        x, y = (rng.uniform(-1.1, 1.1, size=2) * cm.car_racing.PLAYFIELD if trial % 2 else
                stock.track[rng.integers(len(stock.track))][2:] + rng.normal(0, 5, size=2))
        angle, t = rng.uniform(-np.pi, np.pi), rng.choice([0.0, 0.3, 1.0, 5.0])
        frames = []
        for env in (stock, fast):
            env.car.hull.position, env.car.hull.angle, env.t = (float(x), float(y)), float(angle), float(t)
            frames.append(env._render("state_pixels"))
        assert np.array_equal(*frames), (trial, x, y, angle, t)


def test_stock_env_flag(tmp_path):
    args = cm.parse_args(["--stock-env"])[0]
    assert type(cm.make_env(cm.env_config_from_args(args), training=True).unwrapped).__name__ == "CarRacing"
    args = cm.parse_args([])[0]
    assert isinstance(cm.make_env(cm.env_config_from_args(args), training=True).unwrapped, cm.FastCarRacing)


def test_fast_env_culls_with_the_current_tracks_vertices():
    env = car_env(False, 10).unwrapped
    for seed in range(6):  # every reset makes a new track; the culling must use its vertices
        env.reset(seed=seed)
        expected = np.array([poly for poly, _ in env.road_poly], dtype=np.float64)
        vertices, centers, radii = env._road_polygons()
        assert np.array_equal(vertices, expected)
        assert np.all(np.linalg.norm(vertices - centers[:, None], axis=2) <= radii[:, None])


# ------------------------------------------------------------------------------------------------
# Ray (--ray-address): the tests with a cluster skip where Ray is not installed
# ------------------------------------------------------------------------------------------------
def test_without_ray_the_flag_is_a_one_line_error(tmp_path):
    out = run_without_ray(SCRIPT, ["--ray-address", "auto"], cwd=tmp_path)
    assert "requirements-ray.txt" in assert_one_line_error(out)


def test_ray_cluster_run_equals_the_local_pool_run(tmp_path, ray_cluster):
    local, _ = train(tmp_path, "local", workers=2)
    out = run_script(["--run-name", "ray", "--max-iter", "2", *TINY, "--ray-address", ray_cluster.address], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"Ray cluster at {ray_cluster.address} (2 CPUs on 1 node)" in out.stdout
    ray_run = tmp_path / "runs" / "ray"
    assert progress(ray_run, drop=("wall_time_s",)) == progress(local, drop=("wall_time_s",))
    assert {row["num_cpus"] for row in progress(ray_run, drop=())} == {"2"}


def test_ray_worker_killed_mid_run_costs_a_rerun_not_the_run(tmp_path, ray_cluster, rollout_killer):
    flags = ["--max-iter", "2", *TINY, "--quiet"]
    killed, returncode, stderr = rollout_killer(
        [sys.executable, SCRIPT, "--run-name", "ray", "--ray-address", ray_cluster.address, *flags], tmp_path)
    assert killed is not None, "no rollout was running to be killed"
    assert returncode == 0, stderr
    local, _ = train(tmp_path, "local", "--quiet", workers=2)
    assert progress(tmp_path / "runs" / "ray", drop=("wall_time_s",)) == progress(local, drop=("wall_time_s",))


# ------------------------------------------------------------------------------------------------
# Issue 13: --exp-name, TensorBoard, --track (W&B), progress bars, spawn, the Python API
# ------------------------------------------------------------------------------------------------
def scalars(run_dir):
    """{tag: [(step, value)]} of every TensorBoard event file in run_dir, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_exp_name_names_the_run_folder_and_tensorboard_holds_the_progress_rows(tmp_path):
    out = run_script(["--exp-name", "tiny", "--num-workers", "1", "--max-iter", "2", *TINY], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"CarRacing-v3__tiny__1__\d+", run.name)
    config = json.loads((run / "args.json").read_text())
    assert config["exp_name"] == "tiny" and any(b.startswith("openblas ") for b in config["versions"]["blas"])
    rows, (curves, acc) = progress(run, drop=()), scalars(run)
    evaluation = cm.load_weights(str(run / "final.npz"))[2]["evaluation"]  # the last generation's (evaluated)
    assert sorted(evaluation) == ["episodes", "mean", "std"]
    assert f"{evaluation['mean']:.6g}" == rows[-1]["eval_return_mean"]
    numeric = [column for column in rows[0] if column != "env_steps"]
    assert sorted(curves) == sorted(numeric)  # every numeric column; the evaluation's columns are filled here
    for tag, points in curves.items():
        assert [step for step, _ in points] == [int(row["env_steps"]) for row in rows]
        assert np.allclose([value for _, value in points], [float(row[tag]) for row in rows], rtol=1e-6)
    assert "hyperparameters/text_summary" in acc.Tags()["tensors"]
    assert b"|exp_name|tiny|" in acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0]


def test_resumed_run_continues_the_tensorboard_curves_without_the_killed_sessions_points(tmp_path):
    run, _ = train(tmp_path, "tb", "--quiet", iters=2)
    saved = (run / "checkpoint.pkl").read_bytes()
    out = run_here(["--resume", str(run), "--max-iter", "3", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (run / "checkpoint.pkl").write_bytes(saved)  # as if killed after writing generation 3, before its checkpoint
    out = run_here(["--resume", str(run), "--max-iter", "4", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    steps = [int(row["env_steps"]) for row in progress(run)]
    assert len(steps) == 4 and [step for step, _ in scalars(run)[0]["return_mean"]] == steps


def test_track_logs_to_wandb_offline_and_without_wandb_is_one_line(tmp_path):
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, SCRIPT, "--run-name", "w", "--num-workers", "1", "--max-iter", "2", *TINY,
                          "--track", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (files,) = (tmp_path / "runs" / "w" / "wandb").glob("offline-run-*/files")  # in the run folder
    names = {path.name for path in files.rglob("*")}
    assert {"best.npz", "final.npz", "learning_curve.png"} <= names
    records = b"".join(path.read_bytes() for path in files.parent.glob("*.wandb"))
    assert all(column.encode() in records for column in ("return_mean", "eval_return_mean", "axis_ratio", "env_steps"))
    assert not any(name.startswith("events.out.tfevents") for name in names)  # logged, not synced (no copies)
    assert json.loads((tmp_path / "runs" / "w" / "args.json").read_text())["wandb_id"] in files.parent.name
    code = "import runpy, sys; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], " \
           "run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code, SCRIPT, "--track", "--run-name", "none"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "requirements-track.txt" in assert_one_line_error(out)
    assert not (tmp_path / "runs" / "none").exists()


@needs_authors
def test_progress_bar_on_a_terminal_only(tmp_path):
    flags = ["--num-workers", "2", "--max-iter", "1", *TINY]
    code, text = run_on_terminal([sys.executable, SCRIPT, "--run-name", "tty", *flags], cwd=tmp_path)
    assert code == 0, text
    assert "rollouts:" in text and "episode" in text and "%|" in text and "env steps/s" in text
    out = run_script(["--run-name", "pipe", *flags], cwd=tmp_path)
    assert out.returncode == 0 and "%|" not in out.stdout + out.stderr and "episode/s" not in out.stderr
    code, text = run_on_terminal([sys.executable, SCRIPT, "--from-pretrained", AUTHORS, "--num-eval-rollouts", "2",
                                  "--max-episode-steps", "30", "--num-workers", "1"], cwd=tmp_path)
    assert code == 0 and "evaluation:" in text and "%|" in text, text


def test_spawn_as_on_macos_gives_the_same_run(tmp_path):
    out = run_as_on_macos(SCRIPT, ["--help"], cwd=tmp_path)
    assert out.returncode == 0 and "--num-workers" in out.stdout, out.stderr
    flags = ["--num-workers", "2", "--max-iter", "2", *TINY, "--quiet"]
    out = run_as_on_macos(SCRIPT, ["--run-name", "spawn", *flags], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    forked, _ = train(tmp_path, "fork", "--quiet", workers=2)
    assert progress(tmp_path / "runs" / "spawn") == progress(forked)


def test_python_api_cma_on_the_agent_with_a_fitness_of_ones_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    import train_cmaes as cm  # the README's example, as it stands there

    agent = cm.AttentionAgent()  # the paper's agent: 3667 parameters, a 96x96 RGB frame -> 3 actions in [-1, 1]
    frame = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    def fitness(x):  # a toy fitness of the parameters: the agent's action on this frame should be (0.5, 0.8, 0)
        agent.set_flat(x)
        return -np.sum((agent(frame, agent.initial_state())[0] - [0.5, 0.8, 0.0]) ** 2)
    es, _ = cm.make_cma(agent.get_flat(), init_sigma=0.1, population_size=16, seed=0)  # pycma's CMA-ES, seeded
    for generation in range(10):
        candidates = es.ask()
        es.tell(candidates, [-fitness(x) for x in candidates])  # pycma minimizes
    print(fitness(es.x0), "->", fitness(es.result.xfavorite))

    assert fitness(es.result.xfavorite) > 0.1 * fitness(es.x0) and fitness(es.x0) < -0.1
    assert os.listdir(tmp_path) == []  # no outcmaes/, no file at all


def test_importing_the_script_has_no_side_effect(tmp_path):
    code = "import sys; sys.argv = ['x', '--bad-flag']; import train_cmaes; print('quiet')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0 and out.stdout == "quiet\n" and out.stderr == "" and os.listdir(tmp_path) == []


def test_a_second_run_on_a_folder_in_use_is_refused_and_interrupted_writes_are_cleaned(tmp_path):
    first = subprocess.Popen([sys.executable, SCRIPT, "--run-name", "same", "--num-workers", "1", "--max-iter", "50",
                              *TINY], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # its checkpoint, not just its folder: the resume below starts from it
        wait_until((tmp_path / "runs" / "same" / "checkpoint.pkl").exists, "the first run's first checkpoint", first)
        second = run_script(["--run-name", "same", "--num-workers", "1", "--max-iter", "1", *TINY], cwd=tmp_path)
        assert "in use by another run" in assert_one_line_error(second)
        resumed = run_here(["--resume", str(tmp_path / "runs" / "same"), "--max-iter", "60"], cwd=tmp_path)
        assert "in use by another run" in assert_one_line_error(resumed)
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    run = tmp_path / "runs" / "same"
    (run / ".tmp-abc123checkpoint.pkl").write_bytes(b"half a checkpoint")  # a kill in an atomic write
    out = run_here(["--resume", run, "--max-iter", len(progress(run)) + 1, "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]
    again = run_script(["--run-name", "same", "--num-workers", "1", "--max-iter", "1", *TINY], cwd=tmp_path)
    assert "already holds a run" in assert_one_line_error(again)  # ended runs are not started over


def test_resume_after_a_cut_last_row_gives_the_straight_runs_rows_and_an_emptied_file_is_one_line(tmp_path):
    run, _ = train(tmp_path, "cut", iters=1)
    straight, _ = train(tmp_path, "straight", iters=2)
    with open(run / "progress.csv", "a", newline="") as f:
        f.write("2,8,19")  # a crash (or a full disk) in the middle of generation 2's row
    out = run_here(["--resume", str(run), "--max-iter", "2", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert progress(run) == progress(straight)
    with open(run / "progress.csv", newline="") as f:
        assert all(len(row) == len(cm.PROGRESS_COLUMNS) for row in csv.reader(f))
    checkpoint = (run / "checkpoint.pkl").read_bytes()
    (run / "progress.csv").write_bytes(b"")  # `: > progress.csv`
    out = run_here(["--resume", str(run), "--max-iter", "3", "--num-workers", "1"], cwd=tmp_path)
    assert "progress.csv" in assert_one_line_error(out)
    assert (run / "progress.csv").read_bytes() == b"" and (run / "checkpoint.pkl").read_bytes() == checkpoint
    (run / "progress.csv").unlink()  # moved away: the run goes on with a new file
    out = run_here(["--resume", str(run), "--max-iter", "3", "--num-workers", "1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [row["iteration"] for row in progress(run)] == ["3"]
