"""Multi-process (torch.distributed) runs: rank set-up, the DDP wrapper, rank-0-first work.

RecBole 1.2.1 supports one process per GPU (``nproc``, ``world_size``, ``ip``, ``port``,
``offset``, ``gpu_id``) but hard-codes the nccl backend, a CUDA device per rank and
``DistributedDataParallel(model, device_ids=[local_rank])``. The helpers here choose the
backend and device instead (gloo on CPU, nccl on GPU, or as ``ddp_backend`` says), so the
same run works on one machine's CPUs, on several GPUs and across nodes.

Every helper is a no-op in a single-process run, so callers need no ``if``.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_SECONDS = 3600

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


# -- where this process stands -----------------------------------------------------------
def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; nothing to wait for in a single process."""
    if is_distributed():
        dist.barrier()


# -- doing something once ----------------------------------------------------------------
@contextmanager
def main_process_first() -> Iterator[bool]:
    """Run the block on rank 0 first, then on the other ranks.

    For work whose result rank 0 leaves on disk (the layer cache): rank 0 builds it, the
    others wait, then run the same block and find it there (they load, they do not
    build). Yields whether this process is rank 0, so a block can skip what must happen
    once (e.g. ``rebuild=rebuild and is_main``). If rank 0 fails, the other ranks raise
    instead of repeating the work, and nobody waits forever.
    """
    if not is_distributed():
        yield True
        return
    if is_main_process():
        try:
            yield True
        except BaseException as err:
            _share_outcome(f"{type(err).__name__}: {err}")
            raise
        _share_outcome(None)
    else:
        failure = _share_outcome(None)
        if failure is not None:
            raise RuntimeError(
                f"rank {get_rank()}: rank 0 failed in a main-process-first block "
                f"(see rank 0's log): {failure}"
            )
        yield False


def rank0_first(fn: _Fn) -> _Fn:
    """Decorator form of :func:`main_process_first` (the callee is not told its rank)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with main_process_first():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _share_outcome(failure: str | None) -> str | None:
    # A broadcast, not a bare barrier: the waiting ranks learn whether rank 0 succeeded.
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); ``value`` itself when alone."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- setting up a rank -------------------------------------------------------------------
def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """``ddp_backend`` -> the torch.distributed backend for ``device``."""
    requested = (requested or "auto").lower()
    if requested not in BACKENDS:
        raise ValueError(f"ddp_backend must be one of {', '.join(BACKENDS)}, not {requested!r}")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ValueError(
            "ddp_backend: nccl needs CUDA devices, but this rank runs on the CPU "
            "(no GPU visible, or gpu_id is empty); use ddp_backend: gloo or auto"
        )
    return requested


def init_rank(settings: dict) -> None:
    """Join the process group described by a Config's ``final_config_dict``; set device.

    Reads ``local_rank``, ``nproc``, ``world_size``, ``offset``, ``ip``, ``port``,
    ``gpu_id``, ``ddp_backend`` and ``ddp_timeout``; writes ``device``, ``single_spec``
    and ``gpu_id`` (as a string), and quietens ranks other than 0 as RecBole does.
    """
    gpu_id = settings.get("gpu_id", "")
    if isinstance(gpu_id, (tuple, list)):
        gpu_id = ",".join(map(str, gpu_id))
    gpu_id = "" if gpu_id is None else str(gpu_id)
    settings["gpu_id"] = gpu_id
    # As RecBole does: the ids name the visible GPUs, and an empty id hides them all.
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id

    local_rank = int(settings["local_rank"])
    nproc = int(settings.get("nproc") or 1)
    world_size = int(settings.get("world_size") or -1)
    world_size = nproc if world_size <= 0 else world_size
    rank = local_rank + int(settings.get("offset") or 0)
    if settings.get("port") in (None, ""):
        raise KeyError("a distributed run needs 'port' (and 'ip' of rank 0's machine) in the config")

    use_cuda = len(gpu_id) > 0 and torch.cuda.is_available()
    if use_cuda:
        n_gpus = len(gpu_id.split(","))
        if n_gpus < nproc:
            raise ValueError(f"nproc={nproc} processes need as many GPUs, but gpu_id={gpu_id!r} names {n_gpus}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = resolve_backend(settings.get("ddp_backend"), device)
    timeout = timedelta(seconds=float(settings.get("ddp_timeout") or DEFAULT_TIMEOUT_SECONDS))

    if is_distributed():
        # A second Config in the same rank (e.g. a script building two) reuses the group.
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"this process already belongs to a group of {dist.get_world_size()} as rank "
                f"{dist.get_rank()}; the config asks for rank {rank} of {world_size}"
            )
    else:
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timeout,
            init_method=f"tcp://{settings.get('ip') or 'localhost'}:{settings['port']}",
        )
    logger.debug("rank %d of %d joined (%s on %s)", rank, world_size, backend, device)

    settings["world_size"] = world_size
    settings["device"] = device
    settings["single_spec"] = False
    if local_rank != 0:
        settings["state"] = "error"
        settings["show_progress"] = False
        settings["verbose"] = False


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel, on CUDA (one device per rank) or on the CPU."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        # SyncBatchNorm works on CUDA only; on CPU batch norm stays per rank.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model, device_ids=None)


def cpu_threads_per_rank(nproc: int) -> int:
    """Threads each of ``nproc`` CPU ranks may use without oversubscribing the machine."""
    return max(1, (os.cpu_count() or 1) // max(1, nproc))
