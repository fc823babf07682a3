"""Stored runs: small runs of every script whose progress.csv was stored in tests/data/stored_runs/.

A rewrite of a script must not change a number: each case re-runs its commands (every algorithm flag
explicit, a resume in some) and compares the files row by row, wall-clock and CPU-count columns aside.
The scripts pin the kernels of numpy, OpenBLAS, MKL, oneDNN and torch to their AVX2 ones on an x86-64 CPU
with AVX2 (AVX2_KERNELS), where the data was made, so there every cell must be the stored text; elsewhere
(no AVX2, another architecture, a kernel variable set otherwise) a float cell may differ from the stored one
by FLOAT_RTOL relative (a spread of returns, which can be a small difference of large returns: FLOAT_RTOL of
the row's largest return); counts (generations, evaluations, env steps) and every other cell must be exactly
the stored text.

The data is regenerated only when a change is *meant* to change the numbers (a new policy arithmetic,
say), in a commit of its own that says why:

    STORED_RUNS_REGENERATE=1 python -m pytest -q tests/test_stored_runs.py
"""

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import RayCluster, avx2_kernels, cpu_has_avx2
from train_openai_es import DIGIT_SETTINGS  # the variable families args.json records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "stored_runs")
AUTHORS_WEIGHTS = os.path.join(ROOT, "..", "shared", "weights", "attentionagent_carracing.npz")
VOLATILE = {"wall_time_s", "num_cpus"}
FLOAT_RTOL = 1e-3  # far below what a changed algorithm, policy or seed moves (whole percents, other step counts)


def native_env():
    """This environment without the kernel variables that hold AVX2_KERNELS' values: a script started in it
    must pin them itself, or compute with the kernels this CPU would pick (AVX-512 ones here, say)."""
    pins = avx2_kernels()
    return {name: value for name, value in os.environ.items() if pins.get(name) != value}


def pinned_kernels():
    """Whether this machine computes with the scripts' AVX2_KERNELS (an x86-64 CPU with AVX2, none of those
    variables set otherwise): then every number must be the stored text; elsewhere a float may move."""
    return cpu_has_avx2() and all(os.environ.get(name) == value for name, value in avx2_kernels().items())

ES_FLAGS = ["--optimizer", "adam", "--momentum", "0.9", "--weight-decay", "0.005", "--lr-decay", "1.0",
            "--lr-min", "0.0", "--sigma-decay", "1.0", "--sigma-min", "0.0", "--antithetic",
            "--fitness-shaping", "centered-rank", "--activation", "tanh", "--action-bounding", "scale"]
GA_FLAGS = ["--selection", "ranking", "--selection-pressure", "2.0", "--crossover", "blx-alpha",
            "--crossover-rate", "0.9", "--blx-alpha", "0.5", "--mutation", "gaussian", "--mutation-rate", "0.1",
            "--mutation-scale", "0.5", "--replacement", "generational", "--elite-size", "2", "--activation", "tanh"]
CMA_FLAGS = ["--init-sigma", "0.1", "--patch-size", "7", "--patch-stride", "4", "--top-k", "10",
             "--hidden-size", "16", "--max-negative-steps", "20", "--num-rollouts", "1"]

# name -> (script, [commands]); each command is run in order in the same folder, a resume continuing the first.
CASES = {
    "es_cartpole": ("train_openai_es.py", [
        ["--env-id", "CartPole-v1", "--seed", "3", "--population-size", "6", "--sigma", "0.1", "--learning-rate",
         "0.05", "--hidden-sizes", "8", "--max-iter", "4", "--eval-every", "2", "--num-eval-rollouts", "2",
         "--max-episode-steps", "100", "--num-rollouts", "1", *ES_FLAGS, "--obs-norm"]]),
    "es_lunarlander_continuous_resume": ("train_openai_es.py", [
        ["--env-id", "LunarLander-v3", "--env-kwargs", "continuous=true", "--seed", "5", "--population-size", "8",
         "--sigma", "0.05", "--learning-rate", "0.02", "--hidden-sizes", "16", "16", "--max-iter", "2",
         "--eval-every", "2", "--num-eval-rollouts", "2", "--max-episode-steps", "120", "--num-rollouts", "2",
         "--optimizer", "sgd", "--momentum", "0.8", "--weight-decay", "0.01", "--lr-decay", "0.9", "--lr-min",
         "0.01", "--sigma-decay", "0.95", "--sigma-min", "0.03", "--no-antithetic", "--fitness-shaping", "z-score",
         "--activation", "relu", "--action-bounding", "clip", "--obs-norm"],
        ["--resume", "{run}", "--max-iter", "4"]]),
    "es_bipedalwalker_selu": ("train_openai_es.py", [
        ["--env-id", "BipedalWalker-v3", "--seed", "2", "--population-size", "4", "--sigma", "0.05",
         "--learning-rate", "0.03", "--hidden-sizes", "12", "--max-iter", "2", "--eval-every", "1",
         "--num-eval-rollouts", "1", "--max-episode-steps", "80", "--num-rollouts", "1", *ES_FLAGS[:-4],
         "--activation", "selu", "--action-bounding", "scale", "--no-obs-norm"]]),
    "es_acrobot_recurrent": ("train_openai_es.py", [
        ["--env-id", "Acrobot-v1", "--seed", "4", "--population-size", "4", "--sigma", "0.1", "--learning-rate",
         "0.05", "--hidden-sizes", "8", "--recurrent", "--max-iter", "2", "--eval-every", "1",
         "--num-eval-rollouts", "1", "--max-episode-steps", "60", "--num-rollouts", "1", *ES_FLAGS, "--obs-norm"]]),
    "es_carracing_pixels": ("train_openai_es.py", [
        ["--env-id", "CarRacing-v3", "--seed", "1", "--population-size", "2", "--sigma", "0.05", "--learning-rate",
         "0.01", "--hidden-sizes", "8", "--max-iter", "2", "--eval-every", "2", "--num-eval-rollouts", "1",
         "--max-episode-steps", "25", "--max-negative-steps", "20", "--num-rollouts", "1", "--frame-size", "40",
         "--frame-stack", "2", "--grayscale", *ES_FLAGS]]),
    "ga_cartpole": ("train_ga.py", [
        ["--env-id", "CartPole-v1", "--seed", "3", "--population-size", "8", "--hidden-sizes", "8", "--max-iter",
         "4", "--eval-every", "2", "--num-eval-rollouts", "2", "--max-episode-steps", "100", "--num-rollouts",
         "1", *GA_FLAGS]]),
    "ga_lunarlander_continuous_resume": ("train_ga.py", [
        ["--env-id", "LunarLander-v3", "--env-kwargs", "continuous=true", "--seed", "6", "--population-size",
         "8", "--hidden-sizes", "12", "6", "--max-iter", "2", "--eval-every", "2", "--num-eval-rollouts", "2",
         "--max-episode-steps", "120", "--num-rollouts", "2", "--selection", "roulette", "--crossover", "uniform",
         "--crossover-rate", "0.7", "--mutation", "uniform", "--mutation-rate", "0.3", "--mutation-scale", "0.2",
         "--replacement", "parents-vs-children", "--activation", "relu"],
        ["--resume", "{run}", "--max-iter", "4"]]),
    "ga_bipedalwalker_tournament": ("train_ga.py", [
        ["--env-id", "BipedalWalker-v3", "--seed", "2", "--population-size", "6", "--hidden-sizes", "10",
         "--max-iter", "2", "--eval-every", "1", "--num-eval-rollouts", "1", "--max-episode-steps", "80",
         "--num-rollouts", "1", "--selection", "tournament", "--tournament-size", "2", "--crossover", "one-point",
         "--crossover-rate", "1.0", "--mutation", "gaussian", "--mutation-rate", "0.5", "--mutation-scale", "0.1",
         "--replacement", "generational", "--elite-size", "1", "--activation", "selu"]]),
    "ga_multitask": ("train_ga.py", [
        ["--multitask", "CartPole-v1", "Acrobot-v1", "--seed", "7", "--population-size", "6", "--hidden-sizes", "6",
         "4", "--max-iter", "2", "--eval-every", "2", "--num-eval-rollouts", "2", "--max-episode-steps", "50",
         "--num-rollouts", "1", *GA_FLAGS]]),
    "ga_carracing_pixels": ("train_ga.py", [
        ["--env-id", "CarRacing-v3", "--seed", "1", "--population-size", "4", "--hidden-sizes", "8", "--max-iter",
         "2", "--eval-every", "2", "--num-eval-rollouts", "1", "--max-episode-steps", "25",
         "--max-negative-steps", "20", "--num-rollouts", "1", "--frame-size", "40", "--frame-stack", "2",
         "--grayscale", *GA_FLAGS]]),
    "cmaes_lstm": ("train_cmaes.py", [
        ["--seed", "1", "--population-size", "4", "--max-iter", "2", "--eval-every", "2", "--num-eval-rollouts",
         "1", "--max-episode-steps", "30", "--train", "all", "--controller", "lstm", "--query-dim", "4",
         *CMA_FLAGS]]),
    "cmaes_attention_from_authors_resume": ("train_cmaes.py", [
        ["--seed", "2", "--population-size", "4", "--max-iter", "1", "--eval-every", "1", "--num-eval-rollouts",
         "1", "--max-episode-steps", "30", "--train", "attention", "--query-dim", "2", "--no-bias",
         "--init-from", AUTHORS_WEIGHTS, "--controller", "lstm", *CMA_FLAGS],
        ["--resume", "{run}", "--max-iter", "2"]]),
    "cmaes_rnn_and_mlp": ("train_cmaes.py", [
        ["--seed", "3", "--population-size", "4", "--max-iter", "2", "--eval-every", "1", "--num-eval-rollouts",
         "1", "--max-episode-steps", "30", "--train", "all", "--controller", "rnn", "--query-dim", "4",
         *CMA_FLAGS]]),
}


@pytest.mark.parametrize("name", ["es_cartpole", "ga_cartpole", "cmaes_lstm"])
def test_a_run_pins_the_avx2_kernels_and_a_variable_already_set_wins(name, tmp_path):
    if not cpu_has_avx2():
        pytest.skip("the kernels are pinned on x86-64 CPUs with AVX2 only")
    script, commands = CASES[name]
    env = dict(native_env(), OPENBLAS_CORETYPE="Sandybridge")
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *commands[0], "--max-iter", "1",
                          "--run-name", "pinned", "--num-workers", "2", "--quiet"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr + out.stdout
    with open(tmp_path / "runs" / "pinned" / "args.json") as f:
        found = json.load(f)["versions"]
    recorded = {name: value for name, value in env.items() if name.startswith(DIGIT_SETTINGS)}
    assert found["environment"] == {**avx2_kernels(), **recorded}
    assert found["environment"]["OPENBLAS_CORETYPE"] == "Sandybridge"  # set: kept
    assert all(blas.split(",")[0].endswith("Sandybridge") for blas in found["blas"]), found["blas"]
    assert "X86_V4" not in found["numpy_simd"] and "AVX512_ICL" not in found["numpy_simd"]
    assert found["torch_cpu"] == "AVX2"


def test_ray_workers_compute_with_the_drivers_kernels(tmp_path):
    # A cluster whose processes start without the kernel variables: its workers get the driver's.
    pytest.importorskip("ray")
    if not pinned_kernels():
        pytest.skip("needs the pinned AVX2 kernels")
    script, commands = CASES["es_bipedalwalker_selu"]
    cluster = RayCluster(num_cpus=2, env=native_env())
    try:
        out = subprocess.run([sys.executable, os.path.join(ROOT, script), *commands[0], "--run-name", "ray",
                              "--ray-address", cluster.address, "--quiet"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=native_env())
    finally:
        cluster.stop()
    assert out.returncode == 0, out.stderr + out.stdout
    got = read_rows(tmp_path / "runs" / "ray" / "progress.csv")
    assert got == read_rows(os.path.join(DATA, "es_bipedalwalker_selu", "progress.csv"))


def same_cell(got, want, scale=0.0):
    """Exactly the stored text, or, for a float that is not a whole number, within FLOAT_RTOL of the larger of
    the two numbers and `scale` (the row's largest return, for the return columns)."""
    if got == want:
        return True
    try:
        a, b = float(got), float(want)
    except ValueError:
        return False
    return not want.lstrip("-").isdigit() and abs(a - b) <= FLOAT_RTOL * max(abs(a), abs(b), scale, 1e-9)


def return_scale(row):
    """The largest absolute number in a row's return columns (0.0 when it has none)."""
    values = [abs(float(v)) for k, v in row.items() if "return" in k and v not in ("", None)]
    return max(values, default=0.0)


def read_rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in VOLATILE} for row in csv.DictReader(f)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_run_gives_the_same_numbers(name, tmp_path):
    script, commands = CASES[name]
    if any(AUTHORS_WEIGHTS in command for command in commands) and not os.path.exists(AUTHORS_WEIGHTS):
        pytest.skip("needs the authors' weights in ../shared/weights")
    run = tmp_path / "runs" / name
    exact = pinned_kernels()
    for command in commands:
        command = [arg.replace("{run}", str(run)) for arg in command]
        if "--resume" not in command:
            command += ["--run-name", name]
        out = subprocess.run([sys.executable, os.path.join(ROOT, script), *command, "--num-workers", "2",
                              "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=native_env())
        assert out.returncode == 0, out.stderr + out.stdout
    stored = os.path.join(DATA, name)
    files = ["progress.csv"] + (["noise_study.csv"] if (run / "noise_study.csv").exists() else [])
    if os.environ.get("STORED_RUNS_REGENERATE"):
        os.makedirs(stored, exist_ok=True)
        for file in files:
            shutil.copy(run / file, os.path.join(stored, file))
    for file in files:
        want = read_rows(os.path.join(stored, file))
        got = read_rows(run / file)
        assert len(got) == len(want) and got, f"{file}: {len(got)} rows, stored {len(want)}"
        for i, (row_got, row_want) in enumerate(zip(got, want)):
            assert row_got.keys() == row_want.keys(), file
            scale = return_scale(row_want)
            differing = {k: (row_got[k], v) for k, v in row_want.items() if row_got[k] != v
                         and (exact or not same_cell(row_got[k], v, scale if "return" in k else 0.0))}
            assert not differing, f"{file} row {i + 1}: (got, stored) {differing}"
    assert sorted(os.listdir(stored)) == sorted(files)


def test_the_comparison_lets_only_the_last_digits_of_a_float_move():
    assert same_cell("4.87448", "4.87464") and same_cell("-57.6678", "-57.6681")  # another CPU's rounding
    assert not same_cell("4.9", "4.87464") and not same_cell("0.1", "0.05")       # a changed number
    assert not same_cell("550", "549") and not same_cell("tanh", "relu")          # counts and text: exact
    # a spread of two nearly equal returns near -100: judged against the returns, not against itself
    assert same_cell("0.282289", "0.293692", 104.5) and not same_cell("0.282289", "0.293692")
    assert return_scale({"return_mean": "-104.5", "eval_return_std": "", "sigma": "300"}) == 104.5


OLD = os.path.join(ROOT, "tests", "data", "old_checkpoints")  # what its README.md says: made by earlier versions


@pytest.mark.parametrize("folder", sorted(d for d in os.listdir(OLD) if os.path.isdir(os.path.join(OLD, d))))
def test_a_checkpoint_of_an_earlier_version_resumes_and_goes_on_as_that_version_did(folder, tmp_path):
    # A 2-generation run of an earlier version (its checkpoint.pkl, progress.csv, args.json) resumed to 4 by
    # today's script: the rows of generations 3-4 are those the old version wrote in one go, and progress.csv
    # gets today's columns (cells an old version did not write stay empty).
    script = folder.rsplit("_", 1)[0] + ".py"
    run = tmp_path / "run"
    shutil.copytree(os.path.join(OLD, folder), run,
                    ignore=shutil.ignore_patterns("command.txt", "progress_straight_4.csv", "*.gz"))
    with gzip.open(os.path.join(OLD, folder, "checkpoint.pkl.gz")) as f:  # stored gzipped: no *.pkl tracked
        (run / "checkpoint.pkl").write_bytes(f.read())
    exact = pinned_kernels()
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--resume", str(run), "--max-iter", "4",
                          "--num-workers", "1", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=native_env())
    assert out.returncode == 0, out.stderr + out.stdout
    want = read_rows(os.path.join(OLD, folder, "progress_straight_4.csv"))
    got = read_rows(run / "progress.csv")
    assert [row["iteration"] for row in got] == ["1", "2", "3", "4"]
    with open(run / "progress.csv", newline="") as f:
        table = list(csv.reader(f))
    assert all(len(row) == len(table[0]) for row in table)  # well formed: one cell per column in every row
    for row_got, row_want in zip(got, want):
        assert set(row_want) <= set(row_got)
        differing = {k: (row_got[k], v) for k, v in row_want.items() if row_got[k] != v
                     and (exact or not same_cell(row_got[k], v, return_scale(row_want) if "return" in k else 0))}
        assert not differing, f"generation {row_want['iteration']}: (got, old version's) {differing}"
