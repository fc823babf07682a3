import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def avx2_kernels():
    """The scripts' AVX2_KERNELS (read from a script's source: importing it would load numpy first)."""
    with open(os.path.join(ROOT, "train_openai_es.py")) as f:
        tree = ast.parse(f.read())
    namespace = {}
    for node in tree.body:  # AVX2_KERNELS = {...}, then AVX2_KERNELS |= {...}: dict literals
        if isinstance(node, (ast.Assign, ast.AugAssign)) and "AVX2_KERNELS" in ast.unparse(node).split(" ")[0]:
            exec(ast.unparse(node), {}, namespace)
    return namespace["AVX2_KERNELS"]


def cpu_has_avx2():
    """Whether this CPU takes the scripts' AVX2_KERNELS (as a script's start decides it)."""
    with open("/proc/cpuinfo" if os.path.exists("/proc/cpuinfo") else os.devnull) as cpu:
        return {"avx2", "fma"} <= set(cpu.read().split())


# Runs of main() in this process compute with the kernels a script's own start picks: pinned before numpy loads.
assert "numpy" not in sys.modules, "numpy was loaded before conftest.py could pin its kernels"
if cpu_has_avx2():
    os.environ.update({**avx2_kernels(), **os.environ})


import functools
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import uuid

import pytest

# The tests' Ray clusters and drivers authenticate with a token of their own, whatever this machine's Ray
# state is (a ~/.ray/auth_token left by an earlier ray.init(), RAY_AUTH_* variables): the environment
# variables take precedence over the token file, and every cluster and driver of the tests inherits them.
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)


def free_port():
    """A TCP port nobody listens on at the moment, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A driver that joins the cluster at argv[1] and exits 0 if it sees argv[2] CPUs there.
JOIN_AND_COUNT_CPUS = """
import logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
cpus = ray.cluster_resources().get("CPU")
ray.shutdown()
if cpus != float(sys.argv[2]):
    sys.exit(f"the cluster has {cpus} CPUs, not {sys.argv[2]}")
"""


class RayCluster:
    """A one-node Ray cluster of this machine: `ray start --head --block` on free loopback ports, returned ready.

    `--block` keeps the CLI in the foreground, so stop() ends this cluster and no other Ray on the
    machine. Every port the head would take by default gets a free one: two clusters can coexist. Its
    temp folder is its own (`--temp-dir`, short for Ray's socket paths), removed by stop(): Ray's default
    one (/tmp/ray) never names a cluster of the tests, whose `ray_current_cluster` file would send a
    later `ray.init()` or `--ray-address auto` on this machine to a cluster that is gone.

    Ready means what the tests rely on, not an open port (the head's port opens seconds before `ray start`
    has its node up, longer on a machine where Ray starts for the first time): `ray_current_cluster` in its
    temp folder names it, and then a driver joins it and sees its CPUs. Waited for until `timeout` seconds;
    a cluster that does not get there is stopped, and RuntimeError names what did not appear, with the
    end of `ray start`'s output (and of the last driver's).
    """

    def __init__(self, num_cpus=2, env=None, timeout=120):
        self.num_cpus = num_cpus
        self.env = dict(os.environ if env is None else env)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="ray-tests-", dir="/tmp")
        self.state_file = os.path.join(self.temp_dir, "ray_current_cluster")
        self.output = tempfile.TemporaryFile()  # ray start's stdout and stderr, for the message of a failed start
        self.driver_said = ""  # the last probing driver's output
        self.process = subprocess.Popen(self.start_command(), stdout=self.output, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=self.env)
        try:
            self.wait_until_ready(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def start_command(self):
        """The `ray start` command line of this cluster."""
        return [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                f"--num-cpus={self.num_cpus}", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                "--include-dashboard=false", "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={self.temp_dir}"]

    def wait_until_ready(self, deadline):
        """Return once the state file names this cluster and a driver joins it; RuntimeError at `deadline`."""
        self.wait_for(self.state_file_names_it, f"{self.state_file} naming port {self.port}", deadline)
        self.wait_for(lambda: self.driver_joins(deadline), f"a driver that joins {self.address} and sees "
                      f"{self.num_cpus} CPUs", deadline)

    def state_file_names_it(self):
        try:
            with open(self.state_file) as f:
                return f.read().strip().endswith(f":{self.port}")  # Ray's name for the head's host, this port
        except OSError:
            return False

    def driver_joins(self, deadline):
        """Whether a driver in a process of its own (this cluster's environment) joins it and sees its CPUs. A
        token ~/.ray/auth_token holds is sent as `ray start` takes it (Ray 2.60's drivers send it only with
        RAY_AUTH_MODE=token)."""
        env = dict(self.env)
        home = env.get("HOME", os.path.expanduser("~"))
        if "RAY_AUTH_MODE" not in env and os.path.exists(os.path.join(home, ".ray", "auth_token")):
            env["RAY_AUTH_MODE"] = "token"
        command = [sys.executable, "-c", JOIN_AND_COUNT_CPUS, self.address, str(self.num_cpus)]
        try:
            driver = subprocess.run(command, env=env, capture_output=True, text=True,
                                    timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.driver_said = "(it had not ended by the deadline)"
            return False
        self.driver_said = driver.stdout + driver.stderr
        return driver.returncode == 0

    def wait_for(self, ready, what, deadline):
        """Poll ready() until it is true; RuntimeError if ray start exits or `deadline` passes first."""
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                state = ("not ready in time" if self.process.poll() is None else
                         f"ray start exited with code {self.process.returncode}")
                self.output.seek(0)
                said = self.output.read().decode(errors="replace").strip().splitlines()[-20:]
                message = (f"the test's Ray cluster at {self.address} did not start ({state}): {what} did not "
                           "appear; the end of ray start's output:\n" + "\n".join(said))
                if self.driver_said:
                    message += "\nthe last driver's:\n" + "\n".join(self.driver_said.strip().splitlines()[-10:])
                raise RuntimeError(message)
            time.sleep(0.1)

    def kill_head(self):
        """SIGKILL the cluster's GCS server, its head's control service: what a driver on a machine
        that survives sees when the cluster's head machine is lost."""
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().split(b"\0")[0]
                if command.endswith(b"/gcs_server") and os.getpgid(int(pid)) == self.process.pid:
                    os.kill(int(pid), signal.SIGKILL)
                    return
            except (OSError, ValueError):
                continue
        raise RuntimeError("the cluster's gcs_server was not found")

    def stop(self):
        """Stop the cluster (its head process and everything it started)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of it
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        self.process.wait()
        self.output.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 2 CPUs for the whole session; the test skips where Ray is not installed."""
    pytest.importorskip("ray")
    cluster = RayCluster(num_cpus=2)
    yield cluster
    cluster.stop()


def wait_until(condition, what, process=None, timeout=120):
    """Poll condition() until it holds: for a test that started `process` and waits for something it makes (a file,
    its worker processes) before looking at it or signalling it. The test fails, naming `what`, when `process` ends
    first or `timeout` seconds pass; a process still running is killed then, and the message ends with its exit
    code and the end of its output."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = process is not None and process.poll() is not None
        if ended and condition():  # made just before it ended
            return
        if ended or time.monotonic() > deadline:
            state = f"the process exited with code {process.returncode}" if ended else f"not within {timeout} s"
            said = ""
            if process is not None:
                if not ended:
                    process.kill()
                    state += ", the process killed"
                streams = [s.decode(errors="replace") if isinstance(s, bytes) else s or ""
                           for s in process.communicate(timeout=60)]
                said = "; the end of its output:\n" + "\n".join(
                    "\n".join(text.strip().splitlines()[-15:]) for text in streams if text.strip())
            pytest.fail(f"{what} did not appear ({state}){said}")
        time.sleep(0.1)


def run_without_ray(script, args, cwd, env=None):
    """Run a script in an interpreter where `import ray` fails, as where Ray is not installed."""
    code = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, script, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def ancestors(pid):
    """The process ids of pid's parent, its parent's parent, ... (Linux's /proc)."""
    found = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        found.append(pid)
    return found


def run_killing_a_rollout(command, cwd, cluster, timeout=300):
    """Run `command` (a training run on Ray) and SIGKILL one of `cluster`'s Ray worker processes while it
    runs a rollout task (its title is ray::ray_rollout; other clusters' workers, as those of tests running
    in parallel, are left alone). Returns (pid killed or None, exit code, stderr)."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + timeout
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    running = f.read().startswith(b"ray::ray_rollout")
                running = running and cluster.process.pid in ancestors(int(pid))
            except (OSError, ValueError):
                continue
            if running:
                os.kill(int(pid), signal.SIGKILL)
                killed = int(pid)
                break
        time.sleep(0.005)
    _, stderr = proc.communicate(timeout=timeout)
    return killed, proc.returncode, stderr


@pytest.fixture
def rollout_killer(ray_cluster):
    """run_killing_a_rollout on the session's cluster, for tests that kill a Ray worker mid-run (needs /proc)."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc to find Ray's worker processes")
    return functools.partial(run_killing_a_rollout, cluster=ray_cluster)


def run_on_terminal(command, cwd, env=None, timeout=300):
    """Run `command` with stdout and stderr on a pseudo-terminal, as a user at a terminal would (isatty()
    is true). Returns (exit code, everything it printed, as text)."""
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 0.1)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif proc.poll() is not None:
            break
    os.close(leader)
    if proc.poll() is None:
        proc.kill()
    return proc.wait(), b"".join(chunks).decode(errors="replace")


# Runs a script as on macOS: no os.sched_getaffinity, and worker processes started by spawn.
AS_ON_MACOS = ("import multiprocessing, os, runpy, sys; del os.sched_getaffinity; "
               "multiprocessing.set_start_method('spawn'); sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_as_on_macos(script, args, cwd, env=None, timeout=300):
    """Run `script` with `args` where os.sched_getaffinity is missing and multiprocessing's start method
    is spawn (macOS's default), as a CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-c", AS_ON_MACOS, script, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


HEAVY_MODULES = ("torch", "gymnasium", "numpy", "cma", "matplotlib", "ray", "pygame", "tensorboard", "wandb", "tqdm")


def modules_imported_by_help(script):
    """(the heavy modules of HEAVY_MODULES that `python script --help` imports, the text --help prints)."""
    code = ("import json, runpy, sys; sys.argv = [sys.argv[1], '--help']\n"
            "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit: pass\n"
            f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, script], capture_output=True, text=True, timeout=120)
    import json
    return json.loads(out.stderr.strip().splitlines()[-1]), out.stdout


def run_main(module, args, cwd):
    """module.main(args) in this process, in folder cwd, as a subprocess.CompletedProcess (returncode, stdout,
    stderr); a subprocess would cost seconds of imports. The working folder, sys.stdout / sys.stderr and the
    SIGINT / SIGTERM handlers main() installs are restored afterwards."""
    import io

    folder = os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    streams = (sys.stdout, sys.stderr)
    sys.stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    captured = (sys.stdout, sys.stderr)
    os.chdir(cwd)
    try:
        code = module.main([str(a) for a in args])
    finally:
        os.chdir(folder)
        sys.stdout, sys.stderr = streams
        for s, handler in handlers.items():
            signal.signal(s, handler)
    for stream in captured:
        stream.flush()
    out = captured[0].buffer.getvalue().decode()
    err = captured[1].buffer.getvalue().decode()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture
def in_process():
    """run_main as a fixture: in_process(module, args, cwd)."""
    return run_main
