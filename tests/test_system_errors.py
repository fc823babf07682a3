"""A path the system refuses although every check before the run folder passes: one line, no traceback.

Under /proc, root may write (os.access says so) but the kernel creates no folder; a read-only mount, a
quota or a full disk end the same way. Every script must report it as one line with a non-zero exit.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not (os.path.isdir("/proc") and os.access("/proc", os.W_OK)),
                    reason="needs a /proc that looks writable (Linux, as root)")
@pytest.mark.parametrize("script", ["train_openai_es.py", "train_ga.py", "train_cmaes.py"])
def test_a_folder_the_system_cannot_create_is_one_line(tmp_path, script):
    flags = ["--population-size", "8", "--num-workers", "1", "--max-iter", "1"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--logs-dir", "/proc/no-such-folder/runs",
                          *flags], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"{script}: error: ") and "/proc/no-such-folder" in lines[0]
    assert not os.listdir(tmp_path)
