"""Ray 2.60's token authentication, as a user meets it.

`ray start --head` on a machine where an earlier `ray.init()` left ~/.ray/auth_token starts a cluster
that wants that token, while a driver given `--ray-address HOST:PORT` sends none unless told to: Ray
refused every script's driver ("Authentication token is missing or incorrect"). Each script now sends
this machine's token as `ray start` does; a machine without the cluster's token gets one line saying
what to do.
"""

import os
import subprocess
import sys

import pytest

from conftest import RayCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "train_openai_es.py": ["--env-id", "CartPole-v1", "--hidden-sizes", "8", "--population-size", "4",
                           "--max-episode-steps", "20", "--num-eval-rollouts", "1"],
    "train_ga.py": ["--env-id", "CartPole-v1", "--hidden-sizes", "8", "--population-size", "6", "--elite-size", "2",
                    "--max-episode-steps", "20", "--num-eval-rollouts", "1"],
    "train_cmaes.py": ["--population-size", "4", "--num-rollouts", "1", "--max-episode-steps", "20",
                       "--num-eval-rollouts", "1"],
}


def user_env(home):
    """This process's environment as a user's shell has it: no RAY_AUTH_* variables, HOME = home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
    return dict(env, HOME=str(home))


def test_a_cluster_started_where_a_token_file_exists_takes_every_scripts_driver(tmp_path):
    pytest.importorskip("ray")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0123456789abcdef0123456789abcdef")
    cluster = RayCluster(num_cpus=2, env=user_env(home))
    started = []
    try:
        # a machine without the cluster's token, started first: Ray takes about 20 s to give up on it
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        refused = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_openai_es.py"),
                                    *TINY["train_openai_es.py"], "--ray-address", cluster.address, "--run-name",
                                    "refused"], cwd=tmp_path, env=user_env(stranger), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        started.append(refused)
        drivers = {  # all at once: most of a driver's time is spent waiting on Ray
            script: subprocess.Popen([sys.executable, os.path.join(ROOT, script), *flags, "--max-iter", "1",
                                      "--ray-address", cluster.address, "--run-name", script[:-3]],
                                     cwd=tmp_path, env=user_env(home), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            for script, flags in TINY.items()
        }
        started += drivers.values()
        for script, driver in drivers.items():
            stdout, stderr = driver.communicate(timeout=300)
            assert driver.returncode == 0, stderr + stdout
            assert (tmp_path / "runs" / script[:-3] / "final.npz").exists()
        # the stranger gets one line that says what to do, nothing written
        _, stderr = refused.communicate(timeout=300)
        assert refused.returncode == 2
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "token" in lines[0] and "RAY_AUTH_TOKEN" in lines[0], stderr
        assert not (tmp_path / "runs" / "refused").exists()
    finally:
        for process in started:  # none outlives the test, should an assert fail
            process.kill()
            process.communicate()
        cluster.stop()
