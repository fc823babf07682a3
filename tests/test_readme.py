"""The README's Python API examples run as printed and improve the fitness they optimize."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def api_blocks():
    """The ```python blocks of the README's "Python API" section."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_shows_an_api_example_of_each_script():
    blocks = api_blocks()
    for script in ("train_openai_es", "train_ga", "train_cmaes"):
        assert sum(re.search(rf"\b{script}\b", block) is not None for block in blocks) == 1, script


@pytest.mark.parametrize("block", api_blocks(), ids=lambda block: re.search(r"\b(train_[a-z_]+)", block).group(1))
def test_an_api_example_runs_and_improves_its_fitness(block, tmp_path):
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    start, end = map(float, re.search(r"fitness (\S+) -> (\S+)", out.stdout).groups())
    assert end - start >= 0.5 * abs(start) > 0, out.stdout  # at least half of the way to the optimum 0
    assert os.listdir(tmp_path) == []  # importing a script and using its objects wrote nothing
