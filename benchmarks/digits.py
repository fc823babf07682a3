"""Which environment settings move the last digits of a run on this machine.

Re-runs stored-run cases (tests/test_stored_runs.py) under variants of the environment that pick kernels,
cache sizes, threads and SIMD loops, and prints, for each variant and case, whether progress.csv (wall-clock
and CPU-count columns aside) is the same text as under the baseline environment, else its first differing cell.

    python benchmarks/digits.py                       # every variant, a few cases
    python benchmarks/digits.py --cases cmaes_lstm --variants baseline pinned
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_stored_runs import CASES, VOLATILE  # noqa: E402

# name -> (variables set, variables removed), applied to this process's environment
VARIANTS = {
    "baseline": ({}, []),
    "openblas_coretype_skylakex": ({"OPENBLAS_CORETYPE": "SkylakeX"}, []),
    "openblas_coretype_haswell": ({"OPENBLAS_CORETYPE": "Haswell"}, []),
    "openblas_coretype_sandybridge": ({"OPENBLAS_CORETYPE": "Sandybridge"}, []),
    "openblas_coretype_detected": ({}, ["OPENBLAS_CORETYPE"]),
    "openblas_l2_size_unset": ({}, ["OPENBLAS_L2_SIZE"]),
    "openblas_l2_size_2048": ({"OPENBLAS_L2_SIZE": "2048"}, []),
    "openblas_num_threads_1": ({"OPENBLAS_NUM_THREADS": "1"}, []),
    "numpy_avx2_only": ({"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}, []),
    "torch_avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, []),
    "torch_default": ({"ATEN_CPU_CAPABILITY": "default"}, []),
    "mkl_cbwr_avx2": ({"MKL_CBWR": "AVX2"}, []),
    "mkl_cbwr_compatible": ({"MKL_CBWR": "COMPATIBLE"}, []),
    "mkl_cbwr_avx512": ({"MKL_CBWR": "AVX512"}, []),
    "mkl_cbwr_sse4_2": ({"MKL_CBWR": "SSE4_2"}, []),
    "omp_num_threads_1": ({"OMP_NUM_THREADS": "1"}, []),
}
DEFAULT_CASES = ["es_bipedalwalker_selu", "ga_lunarlander_continuous_resume", "es_cartpole", "cmaes_lstm"]


def run_case(name, variant, folder):
    """Runs one case under one variant; returns its progress.csv rows (volatile columns dropped)."""
    script, commands = CASES[name]
    setting, removed = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in removed}
    env.update(setting)
    run = os.path.join(folder, "runs", name)
    for command in commands:
        command = [arg.replace("{run}", run) for arg in command]
        if "--resume" not in command:
            command += ["--run-name", name]
        out = subprocess.run([sys.executable, os.path.join(ROOT, script), *command, "--num-workers", "1",
                              "--quiet"], cwd=folder, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            return f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"
    with open(os.path.join(run, "progress.csv"), newline="") as f:
        return [{k: v for k, v in row.items() if k not in VOLATILE} for row in csv.DictReader(f)]


def first_difference(got, want):
    """'same' or the first cell (row, column, got, baseline) where two runs differ."""
    if isinstance(got, str) or isinstance(want, str):
        return got if isinstance(got, str) else want
    for i, (a, b) in enumerate(zip(got, want)):
        for k in b:
            if a.get(k) != b[k]:
                return f"row {i + 1} {k}: {a.get(k)} vs {b[k]}"
    return "same" if len(got) == len(want) else f"{len(got)} rows vs {len(want)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=sorted(CASES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    print("environment:", {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "MKL", "NPY", "ATEN"))})
    baseline = {}
    for variant in ["baseline"] + [v for v in args.variants if v != "baseline"]:
        for name in args.cases:
            with tempfile.TemporaryDirectory() as folder:
                rows = run_case(name, variant, folder)
            if variant == "baseline":
                baseline[name] = rows
                continue
            print(f"| {variant} | {name} | {first_difference(rows, baseline[name])} |", flush=True)


if __name__ == "__main__":
    main()
