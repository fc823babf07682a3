"""The machinery the three scripts share is word for word the same code in each file (../shared/DESIGN.md):
a reader who has read one file's machinery has read all three, and a fix made in one file is in all three."""
import argparse
import ast
import importlib
import json
import os
import re
import socket
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_openai_es.py", "train_ga.py", "train_cmaes.py")
# The top-level definitions that do the same job in every script. What differs by algorithm reaches them as
# arguments or through the module constants they name (SCRIPT, FORMAT_VERSION, LIMITS, COUNTERS,
# CHECKPOINT_PARTS, CHECKPOINT_MODULES).
SHARED = ("UserError", "PoolLost", "OneLineParser", "HelpFormatter", "check_numbers", "derive_seed",
          "NegativeRewardEarlyStop", "import_optional", "exit_with_parent", "connect_ray", "atomic_write",
          "save_weights", "CheckpointUnpickler", "save_checkpoint", "checkpoint_written", "load_checkpoint", "versions",
          "plot_learning_curve", "main", "open_progress", "check_placement", "interrupted",
          "Console", "signals_held", "live_bar", "start_worker", "use_worker", "run_chunk", "InProcess",
          "RolloutPool", "flags_given", "Recorder", "summary", "duration", "as_written", "csv_cell", "write_video",
          "summary_line", "pretrained_video", "print_evaluation", "default_run_name", "evaluation_pool", "RunBase", "check_paths", "first_line")
# Shared by the two scripts that take the job (CMA-ES has no --env-kwargs).
SHARED_ES_GA = ("parse_env_kwargs", "all_finite", "record_video", "is_frames", "stacked_layers")


def definitions(script):
    """{name: source} of the script's top-level functions and classes."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        source = f.read()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", SHARED_ES_GA)
def test_a_definition_shared_by_es_and_ga_is_the_same_code_in_both(name):
    found = [definitions(script).get(name) for script in ("train_openai_es.py", "train_ga.py")]
    assert None not in found and found[0] == found[1], f"{name} differs or is missing"


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_definition_is_the_same_code_in_all_three_scripts(name):
    found = {script: definitions(script).get(name) for script in SCRIPTS}
    missing = [script for script, source in found.items() if source is None]
    assert not missing, f"{name} is missing in {missing}"
    first = found[SCRIPTS[0]]
    differ = [script for script, source in found.items() if source != first]
    assert not differ, f"{name} differs from {SCRIPTS[0]}'s in {differ}"


def test_the_kernel_pin_and_the_start_before_the_heavy_imports_are_the_same_in_all_three_scripts():
    found = set()
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script), encoding="utf-8") as f:
            source = f.read()
        start = source.index("# Kernels picked by CPU")
        found.add(source[start:source.index("\n    try:\n        build_parser().parse_known_args()", start)])
    assert len(found) == 1 and "os.environ.update({**AVX2_KERNELS, **os.environ})" in found.pop()


def test_the_shared_definitions_stand_below_the_machinery_banner_except_the_configurations_parser():
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script), encoding="utf-8") as f:
            source = f.read()
        lines = source.splitlines()
        banner = next(i for i, line in enumerate(lines, 1) if line.startswith("#") and "Machinery" in line)
        above = [node.name for node in ast.parse(source).body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SHARED
                 and node.lineno < banner]
        assert set(above) <= {"UserError", "PoolLost", "OneLineParser", "HelpFormatter", "derive_seed",
                              "NegativeRewardEarlyStop", "interrupted"}, (script, above)


@pytest.mark.parametrize("script", SCRIPTS)
def test_ray_address_auto_where_rays_temp_folder_names_a_cluster_that_is_gone_is_one_line_at_once(
        script, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    module = importlib.import_module(script[:-3])
    with socket.socket() as s:  # a port nobody listens on: the cluster's head is gone
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")  # left by a crashed head
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda: [])  # no other cluster here
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def hangs(*args, **kwargs):  # what ray.init does on such an address: it waits for minutes
        raise AssertionError("ray.init was called on an address that does not answer")
    monkeypatch.setattr(ray, "init", hangs)
    with pytest.raises(module.UserError, match=f"no Ray cluster answers at auto .*:{port},"):
        module.connect_ray("auto")
    (tmp_path / "ray" / "ray_current_cluster").unlink()  # and where no cluster was ever started
    with pytest.raises(module.UserError, match="no Ray cluster runs on this machine"):
        module.connect_ray("auto")


@pytest.mark.parametrize("script", SCRIPTS)
def test_versions_record_what_sets_a_runs_last_digits(script, monkeypatch):
    module = importlib.import_module(script[:-3])
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "512")  # a cache size, set on some machines here
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.setenv("HOME_NOT_A_SETTING", "x")
    found = module.versions()
    assert found["environment"]["OPENBLAS_CORETYPE"] == "Haswell" and "MKL_CBWR" not in found["environment"]
    assert found["environment"]["OPENBLAS_L2_SIZE"] == "512" and "HOME_NOT_A_SETTING" not in found["environment"]
    assert found["cpu"] and found["torch_cpu"] and isinstance(found["libc"], str)
    assert found["blas"] and all(b.endswith(" threads") for b in found["blas"])  # kernels and threads
    umath = np._core._multiarray_umath
    assert set(found["numpy_simd"]) <= {*umath.__cpu_baseline__, *umath.__cpu_dispatch__}
    json.dumps(found)  # args.json holds it


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_is_written_on_a_thread_and_a_failed_write_raised_by_the_next_save(tmp_path, script,
                                                                                       monkeypatch):
    module = importlib.import_module(script[:-3])
    state = {"format_version": 1, "weights": np.arange(5.0)}
    path = str(tmp_path / "checkpoint.pkl")
    release = threading.Event()
    write = module.atomic_write

    def held_write(*args):
        release.wait(30)
        write(*args)

    monkeypatch.setattr(module, "atomic_write", held_write)
    module.save_checkpoint(path, state)  # returns while its write waits
    assert not os.path.exists(path)
    release.set()
    assert module.checkpoint_written() is None
    with open(path, "rb") as f:
        assert module.CheckpointUnpickler(f).load()["weights"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    module.save_checkpoint(str(tmp_path / "removed" / "checkpoint.pkl"), state)  # its folder is gone
    with pytest.raises(FileNotFoundError):
        module.save_checkpoint(path, state)
    module.save_checkpoint(str(tmp_path / "removed" / "checkpoint.pkl"), state)
    assert isinstance(module.checkpoint_written(), FileNotFoundError)
    assert module.checkpoint_written() is None


@pytest.mark.parametrize("script", SCRIPTS)
def test_check_paths_takes_folder_names_and_a_writable_run_folder_only(tmp_path, script):
    module = importlib.import_module(script[:-3])
    (tmp_path / "afile").write_text("")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "taken").write_text("")

    def check(logs_dir, run_name=None, exp_name="x"):
        module.check_paths(argparse.Namespace(logs_dir=str(tmp_path / logs_dir), run_name=run_name, exp_name=exp_name))

    check("runs", "new")
    check("runs/not/yet", "new")
    bad = [("runs", "a/b", "x", "--run-name"), ("runs", "..", "x", "--run-name"), ("runs", "", "x", "--run-name"),
           ("runs", "n" * 256, "x", "--run-name"), ("runs", None, "a/b", "--exp-name"),
           ("afile", None, "x", "--logs-dir"), ("afile/below", "new", "x", "--logs-dir"),
           ("runs", "taken", "x", "taken is not a folder")]
    for logs_dir, run_name, exp_name, word in bad:
        with pytest.raises(module.UserError, match=re.escape(word)):
            check(logs_dir, run_name, exp_name)


@pytest.mark.parametrize("script", SCRIPTS)
def test_first_line_is_the_messages_first_line_or_the_class_name(script):
    module = importlib.import_module(script[:-3])
    assert module.first_line(ValueError("\n  first\nsecond")) == "first"
    assert module.first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
