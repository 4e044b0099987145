"""One real local Ray cluster per test module, on loopback only, inside a private network
namespace (shared/reference/ray-notes.md): Ray binds every interface and probes cloud metadata
addresses by default; in a namespace that has only ``lo`` those probes fail at once."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
# before ray is imported (the executor sets the same for the clusters it starts)
os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
os.environ.pop("RAY_ADDRESS", None)
CLONE_NEWNET = 0x40000000
CLUSTER_CPUS = 2
CLUSTER_GPUS = 2
"""Logical GPUs: Ray schedules by them and sets CUDA_VISIBLE_DEVICES; torch sees no CUDA here."""


def enter_private_network() -> int:
    """Move this thread (and every process it starts from now on) into a new network namespace
    with only loopback up; returns a handle on the previous one. Skips the test without root."""
    libc = ctypes.CDLL(None, use_errno=True)
    previous = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(previous)
        pytest.skip("the Ray tests run Ray in a private network namespace, which needs root "
                    f"(unshare: {os.strerror(ctypes.get_errno())})")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return previous


def leave_private_network(previous: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns(previous, CLONE_NEWNET)
    os.close(previous)


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster of CLUSTER_CPUS CPUs and CLUSTER_GPUS logical GPUs; this process is its driver, so the
    ``ray`` executor uses it (and leaves it running). Every process it started is ended by id."""
    ray = pytest.importorskip("ray", reason="mk-ray's tests need ray: pip install -e 'plugins/mk-ray[test]'")
    previous = enter_private_network()
    temp = tempfile.mkdtemp(prefix="mkrt-", dir="/tmp")  # short: Unix socket paths
    # the workers import this folder's helpers through the environment the cluster starts with
    # (a job config's code_search_path would also do, but makes Ray ignore max_calls)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), before) if p)
    try:
        try:
            ray.init(address="local", num_cpus=CLUSTER_CPUS, num_gpus=CLUSTER_GPUS, include_dashboard=False,
                     _temp_dir=temp, log_to_driver=False, _node_ip_address="127.0.0.1")
        finally:
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before
        yield ray
    finally:
        started = descendants(os.getpid())
        ray.shutdown()
        for pid in started & descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        leave_private_network(previous)
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.fixture(scope="module")
def toy_pool(tmp_path_factory):
    import mkray_toy

    return mkray_toy.make_models(tmp_path_factory.mktemp("mkray") / "pool")


@pytest.fixture
def host():
    import mkray_toy
    from mk_bayes_sweep import plugin as bayes
    from mk_ray import plugin

    from mergekit_core.testing import fresh_host

    return fresh_host({"mk_ray": plugin, "mk_bayes_sweep": bayes, "mkray_toy": mkray_toy})
