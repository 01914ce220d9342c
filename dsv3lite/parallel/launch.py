"""Process groups: join one under torchrun, or start N local ranks from a test or a notebook.

Two ways in, one code path:

* ``python -m torch.distributed.run --nproc-per-node N ...`` sets RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT; the program calls ``init_distributed()``.
* ``launch(fn, N, *args)`` starts N local processes, sets the same variables for each (127.0.0.1,
  a free port) and calls ``init_distributed()`` there, then ``fn(*args)``; it returns every rank's
  result, or raises ``RankFailure`` naming what each rank did.

NCCL when CUDA is present, gloo otherwise: the same code runs on GPUs and on CPU processes.

Failing fast matters more than it seems: a collective waits for *every* rank, so one rank that
dies or skips a collective leaves the others blocked. The process-group ``timeout`` bounds that
wait (a closed socket usually fails even sooner), and ``launch`` gives the survivors that long to
report their own errors before it kills whatever is left, so a test never hangs.

Local processes start with the ``forkserver`` method where it exists: the server imports torch
once and forks each rank from it, 0.1 s instead of seconds per rank. Like ``spawn``, it runs
``fn`` in a fresh interpreter, so ``fn`` must be importable from a module (not defined in a
notebook cell).
"""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# imported once by the forkserver, so that each rank starts without importing torch again
_PRELOAD = ["torch", "torch.distributed", "dsv3lite.model", "dsv3lite.parallel"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the default process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


class RankFailure(RuntimeError):
    """One or more ranks of a ``launch`` failed; ``failures`` maps rank -> what happened."""

    def __init__(self, failures: dict[int, str], world_size: int) -> None:
        self.failures = failures
        # ranks that died or hung first: the others' errors are usually their consequence
        order = sorted(failures, key=lambda r: ("raised" in _kind(failures[r]), r))
        lines = [f"{len(failures)} of {world_size} ranks failed:"]
        lines += [f"--- rank {r} {_kind(failures[r])}: {failures[r]}" for r in order]
        super().__init__("\n".join(lines))


def _kind(failure: str) -> str:
    return "raised" if not failure.startswith(("exited", "still running")) else "stopped"


def collective_failed(err: BaseException) -> bool:
    """Whether ``err`` comes from a collective or point-to-point transfer that failed: a peer
    froze past the timeout, died or closed its socket (gloo raises a plain RuntimeError)."""
    return isinstance(err, dist.DistError) or "gloo" in str(err) or "NCCL" in str(err)


def default_backend() -> str:
    """'nccl' when CUDA is available, else 'gloo'."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> DistInfo:
    """Join the process group that torchrun's environment variables describe.

    ``timeout_s`` bounds every collective: a rank waiting on a dead peer raises after it.
    With NCCL each process takes GPU ``LOCAL_RANK``. Calling it twice returns the current group.
    """
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"init_distributed needs the environment variables {list(_ENV)} (torchrun sets them); "
            f"missing: {missing}"
        )
    backend = backend or default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def teardown() -> None:
    """Leave the process group (a no-op when none is initialised)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_same_on_all_ranks(value: Any, what: str, group: dist.ProcessGroup | None = None) -> None:
    """Raise ValueError on every rank unless ``repr(value)`` hashes the same on all of them.

    Ranks built from different configs would exchange tensors of the wrong sizes and fail
    later with an obscure message, or not fail at all; one all_gather of a hash catches it.
    """
    digest = hashlib.sha256(repr(value).encode()).hexdigest()[:16]
    digests: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) > 1:
        by_hash: dict[str, list[int]] = {}
        for r, h in enumerate(digests):
            by_hash.setdefault(h, []).append(r)
        raise ValueError(
            f"{what} differs across ranks (ranks grouped by its hash: {list(by_hash.values())}); "
            "every rank must be built from the same one"
        )


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    backend: str = "gloo",
    threads_per_rank: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks in one process group; return the results.

    ``timeout_s`` bounds the whole job; ``pg_timeout_s`` is the process group's collective
    timeout. Ranks get ``threads_per_rank`` intra-op threads (default: cores / ranks, at least
    one), so that N ranks do not fight over the same cores. Results travel back pickled.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(_PRELOAD)
    queue = multiprocessing.get_context(method).SimpleQueue()
    port = free_port()
    context = tmp.start_processes(
        _rank_main,
        args=(fn, args, world_size, port, backend, pg_timeout_s, threads_per_rank, queue),
        nprocs=world_size,
        join=False,
        start_method=method,
    )
    results, failures = _collect(context.processes, queue, timeout_s, pg_timeout_s)
    if failures:
        raise RankFailure(failures, world_size)
    return [results[r] for r in range(world_size)]


def _collect(processes, queue, timeout_s: float, pg_timeout_s: float):
    """Wait for every rank; after the first failure, give the others one process-group timeout
    (plus a second) to fail on their own, then kill what is left."""
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    first_failure: float | None = None

    def drain() -> None:
        while not queue.empty():
            rank, ok, payload = queue.get()
            (results if ok else failures)[rank] = pickle.loads(payload) if ok else payload

    while any(p.is_alive() for p in processes):
        multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.05)
        dead = [r for r, p in enumerate(processes) if not p.is_alive()]
        drain()  # after listing the dead: a rank's result is queued before it exits
        for r in dead:
            if r not in results and r not in failures:
                failures[r] = f"exited with code {processes[r].exitcode} before returning a result"
        if failures and first_failure is None:
            first_failure = time.monotonic()
            deadline = min(deadline, first_failure + pg_timeout_s + 1.0)
        if time.monotonic() > deadline:
            break
    drain()
    for r, p in enumerate(processes):
        if p.is_alive():
            p.kill()
            p.join()
            why = "the job's" if first_failure is None else "the grace period after a failure"
            failures.setdefault(r, f"still running when {why} timeout expired; killed")
        elif r not in results:
            failures.setdefault(r, f"exited with code {p.exitcode} before returning a result")
    return results, failures


def _rank_main(
    local_rank: int,
    fn: Callable[..., Any],
    args: tuple,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout_s: float,
    threads: int,
    queue,
) -> None:
    """One local rank: torchrun's environment, the process group, fn, the result or the error."""
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    try:
        init_distributed(backend, timeout_s=pg_timeout_s)
        result = fn(*args)
    except BaseException as err:  # report everything, SystemExit included, then stop
        hint = ""
        if collective_failed(err):
            hint = (
                f"\n(a collective or point-to-point transfer failed: most likely another rank died "
                f"or stopped participating; process-group timeout {pg_timeout_s:g} s)"
            )
        queue.put(
            (local_rank, False, f"{type(err).__name__}: {err}{hint}\n{traceback.format_exc()}")
        )
        os._exit(1)  # no teardown, no interpreter shutdown: a broken group can hang in either
    # plain pickle: torch's queue reducers would share tensors through this process's memory,
    # which is gone by the time the parent reads them
    queue.put((local_rank, True, pickle.dumps(result)))
    teardown()
