"""The tests' Ray clusters leave no Ray state on the machine: Ray's default temp folder never names one. And
RayCluster returns a cluster that is ready (issue 40): `ray start` opens the head's port seconds before it writes
`ray_current_cluster`, longer where Ray starts for the first time, and a test that looked then failed."""
import os
import subprocess
import sys
import time

import pytest

from conftest import RayCluster

DEFAULT_CURRENT_CLUSTER = "/tmp/ray/ray_current_cluster"  # what ray.init() and `--ray-address auto` read


def named_cluster():
    try:
        with open(DEFAULT_CURRENT_CLUSTER) as f:
            return f.read().strip()
    except OSError:
        return None


def test_a_test_cluster_and_its_driver_write_nothing_into_rays_default_temp_folder():
    pytest.importorskip("ray")
    cluster = RayCluster(num_cpus=1)
    try:
        driver = subprocess.run([sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1]); "
                                 "print(ray.get(ray.remote(lambda: 7).remote())); ray.shutdown()", cluster.address],
                                capture_output=True, text=True, timeout=120)
        assert driver.returncode == 0 and driver.stdout.split()[-1] == "7", driver.stderr
        assert os.path.exists(os.path.join(cluster.temp_dir, "ray_current_cluster"))  # its own folder
        assert cluster.address.rsplit(":", 1)[1] not in (named_cluster() or "")
    finally:
        cluster.stop()
    assert not os.path.exists(cluster.temp_dir)
    assert cluster.address.rsplit(":", 1)[1] not in (named_cluster() or "")



# Stand-ins for `ray start --head --block` (argv: the head's port, the temp folder), started as RayCluster starts it.
# A slow start: the head's port accepts connections at once; `ray_current_cluster` appears a second later,
# empty, and names the cluster half a second after that.
SLOW_START = """
import os, socket, sys, time
port, temp_dir = int(sys.argv[1]), sys.argv[2]
head = socket.create_server(("127.0.0.1", port))
print("the head's port is open", flush=True)
time.sleep(1)
with open(os.path.join(temp_dir, "ray_current_cluster"), "w") as f:
    f.flush()
    time.sleep(0.5)
    f.write(f"127.0.0.1:{port}")
time.sleep(600)
"""
NEVER_STARTS = SLOW_START.replace("time.sleep(1)", "time.sleep(600)")
FAILS = "import sys; print('ray start: no luck today'); sys.exit(3)"


class FakeStart(RayCluster):
    """RayCluster over a stand-in for `ray start` (`script`), whose driver joins at its `joins_at`-th try (0: never)."""

    def __init__(self, script, joins_at=1, timeout=30, made=None):
        if made is not None:
            made.append(self)  # for a test whose construction raises
        self.script = script
        self.joins_at = joins_at
        self.tries = []  # per driver's try: whether the state file named the cluster then
        super().__init__(num_cpus=1, timeout=timeout)

    def start_command(self):
        return [sys.executable, "-c", self.script, str(self.port), self.temp_dir]

    def driver_joins(self, deadline):
        self.tries.append(self.state_file_names_it())
        self.driver_said = f"try {len(self.tries)}: refused"
        return len(self.tries) == self.joins_at


def test_a_cluster_is_returned_once_its_state_file_names_it_and_a_driver_joins_not_when_its_port_opens():
    started = time.monotonic()
    cluster = FakeStart(SLOW_START, joins_at=3)
    try:
        assert time.monotonic() - started >= 1.5
        with open(cluster.state_file) as f:
            assert f.read() == cluster.address  # (a real one names the host as Ray sees it)
        assert cluster.tries == [True, True, True]  # drivers tried once it was named, until one joined
    finally:
        cluster.stop()
    assert cluster.process.poll() is not None and not os.path.exists(cluster.temp_dir)


@pytest.mark.parametrize("script,joins_at,missing,said", [
    (NEVER_STARTS, 1, "ray_current_cluster naming port ", "not ready in time"),
    (SLOW_START, 0, "a driver that joins 127.0.0.1:", ": refused"),
    (FAILS, 1, "ray_current_cluster naming port ", "ray start exited with code 3"),
], ids=["never-named", "no-driver-joins", "ray-start-fails"])
def test_a_cluster_that_does_not_get_ready_is_stopped_with_what_did_not_appear(script, joins_at, missing, said):
    made = []
    try:
        with pytest.raises(RuntimeError) as error:
            FakeStart(script, joins_at=joins_at, timeout=2, made=made)
    finally:
        if made[0].process.returncode is None:  # returned (a readiness rule that took it for ready): stopped here
            made[0].stop()
    message = str(error.value)
    assert missing in message and "did not appear" in message and said in message, message
    assert ("no luck today" if script == FAILS else "the head's port is open") in message  # ray start's output
    assert made[0].process.poll() is not None and not os.path.exists(made[0].temp_dir)  # nothing left behind
