"""The tests' Ray clusters leave no Ray state on the machine: Ray's default temp folder never names one."""
import os
import subprocess
import sys

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
