"""Ctrl-C, SIGTERM and a console that goes away, at any moment of a generation, in all three scripts (issue 26):
exit 130 with a resume hint that names the checkpoint that exists, or the run goes on without its console."""

import csv
import importlib
import os
import signal
import subprocess
import sys

import pytest

from conftest import run_main, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_openai_es.py", "train_ga.py", "train_cmaes.py")
VECTOR = ["--env-id", "CartPole-v1", "--population-size", "8", "--hidden-sizes", "4", "--num-eval-rollouts", "2"]
FLAGS = {  # a few seconds a run, in one process
    "train_openai_es.py": VECTOR,
    "train_ga.py": VECTOR,
    "train_cmaes.py": ["--population-size", "4", "--num-rollouts", "1", "--max-episode-steps", "30",
                       "--num-eval-rollouts", "1", "--patch-size", "2", "--patch-stride", "8", "--query-dim", "1",
                       "--top-k", "1", "--hidden-size", "1", "--controller", "mlp", "--num-frames", "1"],
}


def run_in_process(module, tmp_path, capsys, *extra):
    """module.main(...) in this process on a tiny run in tmp_path/runs/r: (exit code, stderr lines)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = module.main([*FLAGS[module.SCRIPT], "--num-workers", "1", "--eval-every", "2",
                            "--logs-dir", str(tmp_path / "runs"), "--run-name", "r", "--quiet", *extra])
    finally:
        for signum, handler in handlers.items():  # main() installs its own
            signal.signal(signum, handler)
    return code, capsys.readouterr().err.strip().splitlines()


def generations(run):
    with open(run / "progress.csv", newline="") as f:
        return [int(row["iteration"]) for row in csv.DictReader(f)]


class DropsItsException:
    """Raises SIGINT in its __del__, where Python prints and drops the handler's KeyboardInterrupt (as in a fork
    handler while the workers start, or in tqdm's __del__)."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_ctrl_c_whose_keyboard_interrupt_python_drops_still_stops_the_run_at_the_next_checkpoint(
        script, tmp_path, capsys, monkeypatch):
    module = importlib.import_module(script[:-3])
    original = module.RolloutPool.map
    calls = []

    def map_dropping_a_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # within generation 2 or 3, whatever the evaluations
            DropsItsException()  # created and collected at once
        return original(self, *args, **kwargs)
    monkeypatch.setattr(module.RolloutPool, "map", map_dropping_a_ctrl_c)
    code, err = run_in_process(module, tmp_path, capsys, "--max-iter", "8")
    run = tmp_path / "runs" / "r"
    saved = generations(run)[-1]
    assert code == 130 and saved < 8, err  # without STOPPING the run goes on to generation 8, exit 0
    assert any(f"the checkpoint of generation {saved} is kept" in line for line in err), err
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, script), "--resume", str(run), "--max-iter",
                              str(saved), "--num-workers", "1"], capture_output=True, text=True, timeout=300)
    assert f"resuming at generation {saved} " in resumed.stdout, resumed.stdout + resumed.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_resume_hint_names_the_generation_the_checkpoint_holds_or_says_there_is_none(
        script, tmp_path, capsys, monkeypatch):
    module = importlib.import_module(script[:-3])
    original = module.Run.record
    calls = []

    def record_interrupted(self, *args, **kwargs):  # a Ctrl-C after tell(), before the checkpoint
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)
    monkeypatch.setattr(module.Run, "record", record_interrupted)
    stop_at = 3  # generation 3 is told, not checkpointed
    code, err = run_in_process(module, tmp_path, capsys, "--max-iter", "5")
    run = tmp_path / "runs" / "r"
    assert code == 130 and generations(run) == [1, 2]
    assert any("the checkpoint of generation 2 is kept" in line for line in err), err
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, script), "--resume", str(run), "--max-iter", "2",
                              "--num-workers", "1"], capture_output=True, text=True, timeout=300)
    assert "resuming at generation 2 " in resumed.stdout, resumed.stdout + resumed.stderr
    # Interrupted in generation 1: no checkpoint exists, and the hint says so.
    calls.clear()
    stop_at = 1
    code, err = run_in_process(module, tmp_path / "first", capsys, "--max-iter", "5")
    assert code == 130 and not (tmp_path / "first" / "runs" / "r" / "checkpoint.pkl").exists()
    assert any("no generation had finished: there is no checkpoint to resume" in line for line in err), err
    assert not any("resume with" in line for line in err), err


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_console_whose_reader_goes_away_costs_the_console_not_the_run(script, tmp_path):
    # `python script ... | head -n 1`: the reader reads one line and goes; the run trains on, checkpoints kept.
    run = tmp_path / "runs" / "r"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *FLAGS[script], "--num-workers", "2",
                             "--eval-every", "2", "--max-iter", "5", "--logs-dir", str(tmp_path / "runs"),
                             "--run-name", "r"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()  # the reader is gone: every later console line meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0 and "Traceback" not in err and "Broken pipe" not in err, err
    assert generations(run) == [1, 2, 3, 4, 5] and (run / "final.npz").exists()
    module = importlib.import_module(script[:-3])
    _, state = module.load_checkpoint(str(run))
    assert state["args"]["max_iter"] == 5


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_refused_resume_writes_nothing_and_releases_the_run_folder(script, tmp_path, capsys):
    module = importlib.import_module(script[:-3])
    assert run_in_process(module, tmp_path, capsys, "--max-iter", "1")[0] == 0
    run = tmp_path / "runs" / "r"
    (run / "progress.csv").write_bytes(b"")  # `: > progress.csv`: the resume is refused
    files = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    resume = ["--resume", run, "--max-iter", "2", "--num-workers", "1", "--quiet"]
    out = run_main(module, resume, tmp_path)
    assert out.returncode == 2 and "progress.csv" in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == files
    (run / "progress.csv").unlink()  # moved away: in this same process, the folder is free again
    out = run_main(module, resume, tmp_path)
    assert out.returncode == 0, out.stderr
    assert generations(run) == [2]


def test_sigterm_during_a_rollout_of_a_cmaes_run_on_one_worker_in_a_fresh_process_is_one_line_and_exit_130(
        tmp_path):
    # One worker runs the rollouts in the script's own process, which then never imported a process pool: the
    # KeyboardInterrupt raised inside a rollout must still reach the resume hint (no AttributeError traceback).
    # (CMA-ES named concurrent.futures.process in an except clause; ES and GA import BrokenProcessPool by name.)
    script = "train_cmaes.py"
    run = tmp_path / "runs" / "r"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *FLAGS[script], "--num-workers", "1",
                             "--max-iter", "100000", "--logs-dir", str(tmp_path / "runs"), "--run-name", "r",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (run / "checkpoint.pkl").exists(), "the first checkpoint", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "the checkpoint of generation" in err, err


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_ctrl_c_inside_signals_held_stops_the_run_as_the_block_ends_not_inside_it(script):
    # TensorBoard's calls run inside signals_held(): main()'s handler only sets STOPPING while HOLDING is set, and
    # the block raises KeyboardInterrupt once the call it guards has returned (and only then).
    module = importlib.import_module(script[:-3])
    module.STOPPING.clear()
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with module.signals_held():
            assert module.HOLDING.is_set()
            module.STOPPING.set()  # what the handler does for a Ctrl-C that arrives here
            finished.append(True)  # the guarded call goes on to its end
    assert finished and not module.HOLDING.is_set()
    module.STOPPING.clear()
    with module.signals_held():  # no Ctrl-C: nothing raised
        pass
