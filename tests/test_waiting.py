"""A test that starts a process waits for what the process makes (a file, its workers), not for a time (issue 40):
conftest.wait_until fails naming what did not appear, with the process's exit code and output, and leaves no
process behind."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_until


def test_waiting_for_a_file_ends_when_it_appears(tmp_path):
    made = tmp_path / "checkpoint.pkl"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(1); open(sys.argv[1], 'w').close(); "
                             "time.sleep(600)", str(made)])
    try:
        wait_until(made.exists, "the file", proc)
        assert made.exists() and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("code,timeout,said", [
    ("import sys; print('no checkpoint today', file=sys.stderr); sys.exit(3)", 120, "exited with code 3"),
    ("import time; print('working', flush=True); time.sleep(600)", 1, "not within 1 s"),
])
def test_waiting_fails_naming_what_did_not_appear_and_leaves_no_process(tmp_path, code, timeout, said):
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        wait_until((tmp_path / "checkpoint.pkl").exists, "the run's first checkpoint", proc, timeout=timeout)
    message = str(failure.value)
    assert message.startswith("the run's first checkpoint did not appear") and said in message, message
    assert ("no checkpoint today" if "exit" in code else "working") in message  # the end of its output
    assert proc.poll() is not None and time.monotonic() - started < 30  # ended at once, not at the deadline
    proc.send_signal(signal.SIGTERM)  # as a test's `finally` may, once more: no error
    proc.communicate(timeout=5)
