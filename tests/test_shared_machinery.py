"""The machinery the three scripts share is word for word the same code in each file (../shared/DESIGN.md):
a reader who has read one file's machinery has read all three, and a fix made in one file is in all three."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_openai_es.py", "train_ga.py", "train_cmaes.py")
# The top-level definitions that do the same job in every script. What differs by algorithm reaches them as
# arguments or through the module constants they name (SCRIPT, FORMAT_VERSION, LIMITS, COUNTERS,
# CHECKPOINT_PARTS, CHECKPOINT_MODULES).
SHARED = ("UserError", "PoolLost", "OneLineParser", "HelpFormatter", "check_numbers", "derive_seed",
          "NegativeRewardEarlyStop", "import_optional", "exit_with_parent", "connect_ray", "atomic_write",
          "save_weights", "CheckpointUnpickler", "save_checkpoint", "load_checkpoint", "versions",
          "plot_learning_curve", "main")


def definitions(script):
    """{name: source} of the script's top-level functions and classes."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        source = f.read()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_definition_is_the_same_code_in_all_three_scripts(name):
    found = {script: definitions(script).get(name) for script in SCRIPTS}
    missing = [script for script, source in found.items() if source is None]
    assert not missing, f"{name} is missing in {missing}"
    first = found[SCRIPTS[0]]
    differ = [script for script, source in found.items() if source != first]
    assert not differ, f"{name} differs from {SCRIPTS[0]}'s in {differ}"


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
                              "NegativeRewardEarlyStop"}, (script, above)
