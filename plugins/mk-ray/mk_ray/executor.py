"""The ``ray`` executor: each sweep trial is a Ray task, with the CPUs and GPUs it asks for.

The sweep's driver hands out points (``items.take(n)``, batches from a search that makes them)
as slots free up, and records every outcome itself: workers get the sweep's config and a point,
merge and score in their own process, and return metrics, never tensors. A trial that raises,
whose worker dies or that runs past ``trial_timeout`` runs again up to ``retries`` times, then
comes back as a :class:`~mergekit_core.api.TrialFailure` and the sweep goes on.

Safety (measured facts: shared/reference/ray-notes.md): a cluster started here (``address:
local``) has its node on 127.0.0.1 with every listener on loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), no dashboard, usage statistics off, token auth off
(it would write ``~/.ray/auth_token``) and its temp folder under /tmp, removed at the end.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mergekit_core import ConfigError, Executor, Param
from mergekit_core.api import TrialFailure

LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Set (unless already set) before ray is imported for a cluster of our own."""
POLL_S = 0.5
"""How long one wait for a finished trial lasts (Ctrl-C and timeouts are seen between waits)."""


def _run_trial(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def _run_trial_in_fresh_process(fn: Callable[[Any], Any], item: Any) -> Any:
    """The same, as a function of its own: Ray keeps ``max_calls`` per function, not per call."""
    return fn(item)


def one_line(exc: BaseException) -> str:
    """A trial's error in one line: the trial's own exception (type: message), or what Ray says
    happened to its worker."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        text, exc_name = (str(cause.args[0]) if cause.args else str(cause)), type(cause).__name__
    else:
        text, exc_name = str(exc), type(exc).__name__
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{exc_name}: {first}" if first else exc_name


class RayExecutor(Executor):
    name = "ray"
    description = "Runs sweep trials as Ray tasks on a private local cluster or an existing one."
    params = (
        Param("address", "local", "local: a private cluster on this machine for the sweep, shut down at the "
              "end; auto or ray://HOST:PORT: attach to a running cluster and leave it running", type=str),
        Param("num_cpus", 1.0, "CPUs each trial asks for", type=float, min=0),
        Param("num_gpus", 0.0, "GPUs each trial asks for (0.5 packs two trials on one GPU)", type=float, min=0),
        Param("max_concurrent", 0, "trials running at once (0: as many as the cluster's CPUs and GPUs "
              "hold)", type=int, min=0),
        Param("trial_timeout", 0.0, "seconds a trial may run before it is cancelled and counted as a "
              "failed attempt (0: no limit)", type=float, min=0),
        Param("retries", 1, "times a failed trial runs again before it is recorded as failed", type=int, min=0),
        Param("runtime_env", None, "Ray runtime_env for the workers (env_vars, working_dir, py_modules, ...)",
              type=dict),
        Param("cluster_cpus", 0, "address local only: CPUs of the private cluster (0: all of this "
              "machine's)", type=int, min=0),
    )

    def validate(self, params: dict[str, Any]) -> None:
        address = params["address"]
        if address not in ("local", "auto") and not address.startswith("ray://"):
            raise ConfigError(f"executor ray: address must be local, auto or ray://HOST:PORT, got {address!r}")

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], params: dict[str, Any]) -> Iterator[Any]:
        session = RaySession(params)
        try:
            session.connect()
            yield from session.run(fn, items)
        finally:
            session.close()


class RaySession:
    """One sweep's use of Ray: connect (or start a cluster), check resources, run, clean up."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.ray: Any = None
        self.started = False
        self.temp_dir: str | None = None
        self.pending: dict[Any, tuple[Any, int, float]] = {}

    # ------------------------------------------------------------------ cluster

    def connect(self) -> None:
        p = self.params
        if p["address"] == "local":
            for key, value in LOCAL_ENV.items():
                os.environ.setdefault(key, value)
        import ray

        self.ray = ray
        if not ray.is_initialized():  # a program that called ray.init itself keeps its cluster
            common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
            self.started = True  # ray.shutdown() after a failed start ends what it did start
            try:
                if p["address"] == "local":
                    self.temp_dir = tempfile.mkdtemp(prefix="mk-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
                    ray.init(address="local", num_cpus=p["cluster_cpus"] or None, _temp_dir=self.temp_dir,
                             _node_ip_address="127.0.0.1", **common)
                else:
                    ray.init(address=p["address"], **{k: v for k, v in common.items() if k != "include_dashboard"})
            except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
                what = "start a private Ray cluster" if p["address"] == "local" else f"reach the Ray cluster at {p['address']}"
                raise ConfigError(f"executor ray: could not {what}: {one_line(exc)}",
                                  hint="address: auto needs a cluster started with 'ray start --head' on this "
                                       "machine (or RAY_ADDRESS); address: local starts one") from None
        self.check_resources()

    def check_resources(self) -> None:
        """A trial no node can hold is an error now, not a task pending forever."""
        cpus, gpus = self.params["num_cpus"], self.params["num_gpus"]
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
            big = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            raise ConfigError(
                f"executor ray: a trial asks for {cpus:g} CPU and {gpus:g} GPU, but no node of the cluster has "
                f"that (the largest: {big.get('CPU', 0):g} CPU, {big.get('GPU', 0):g} GPU); lower num_cpus/"
                "num_gpus in executor.params, or add a node that has them")

    def concurrency(self) -> int:
        if self.params["max_concurrent"]:
            return self.params["max_concurrent"]
        cpus, gpus = self.params["num_cpus"], self.params["num_gpus"]
        slots = 0
        for n in (n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")):
            fit = [math.floor(n.get(k, 0) / v + 1e-9) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0]
            slots += min(fit) if fit else int(n.get("CPU", 1))
        return max(1, slots)

    def close(self) -> None:
        ray = self.ray
        if ray is None:
            return
        for ref in list(self.pending):  # Ctrl-C or an error: running trials stop now
            ray.cancel(ref, force=True)
        self.pending.clear()
        if self.started:
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    # ------------------------------------------------------------------ trials

    def run(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        ray, p = self.ray, self.params
        fresh = p["num_gpus"] > 0  # a fresh process per GPU trial gives its memory back
        task = ray.remote(max_calls=1)(_run_trial_in_fresh_process) if fresh else ray.remote(_run_trial)
        options = {"num_cpus": p["num_cpus"], "num_gpus": p["num_gpus"], "max_retries": 0}
        if p["runtime_env"]:  # per task: also on a cluster this process was already connected to
            options["runtime_env"] = p["runtime_env"]
        task = task.options(**options)
        fn_ref = ray.put(fn)
        take = getattr(items, "take", None)
        if take is None:
            iterator = iter(items)
            take = lambda n: list(itertools.islice(iterator, n))  # noqa: E731
        width = self.concurrency()
        retry: list[tuple[Any, int]] = []
        exhausted = False

        def submit(item: Any, attempt: int) -> None:
            self.pending[task.remote(fn_ref, item)] = (item, attempt, time.monotonic())

        def failed(item: Any, attempt: int, error: str) -> TrialFailure | None:
            if attempt <= p["retries"]:
                retry.append((item, attempt + 1))
                return None
            return TrialFailure(item, error, attempt)

        while True:
            while retry and len(self.pending) < width:
                submit(*retry.pop(0))
            if not exhausted and len(self.pending) < width:
                new = take(width - len(self.pending))
                exhausted = not new
                for item in new:
                    submit(item, 1)
            if not self.pending:
                if retry:
                    continue
                return
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                item, attempt, _ = self.pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # the trial's error, or its worker's death
                    outcome = failed(item, attempt, one_line(exc))
                if outcome is not None:
                    yield outcome
            if p["trial_timeout"]:
                now = time.monotonic()
                for ref, (item, attempt, since) in list(self.pending.items()):
                    if now - since > p["trial_timeout"]:
                        ray.cancel(ref, force=True)
                        del self.pending[ref]
                        outcome = failed(item, attempt, f"TimeoutError: trial ran past trial_timeout "
                                                        f"({p['trial_timeout']:g} s)")
                        if outcome is not None:
                            yield outcome
