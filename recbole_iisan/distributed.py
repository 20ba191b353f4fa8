"""Multi-process (torch.distributed) runs: rank set-up, the DDP wrapper, rank-0-first work.

RecBole 1.2.1 supports one process per GPU (``nproc``, ``world_size``, ``ip``, ``port``,
``offset``, ``gpu_id``) but hard-codes the nccl backend, a CUDA device per rank and
``DistributedDataParallel(model, device_ids=[local_rank])``. The helpers here choose the
backend and device instead (gloo on CPU, nccl on GPU, or as ``ddp_backend`` says), so the
same run works on one machine's CPUs, on several GPUs and across nodes.

Every helper is a no-op in a single-process run, so callers need no ``if``.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_SECONDS = 3600


# -- where this process stands -----------------------------------------------------------
# This process's rank on its own machine, set by init_rank. Processes started otherwise
# (torchrun) have LOCAL_RANK in the environment; a group made by hand counts as one machine.
_local_rank: int | None = None


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_local_rank() -> int:
    """This process's rank on its machine; 0 when not distributed."""
    if not is_distributed():
        return 0
    if _local_rank is not None:
        return _local_rank
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def get_world_size() -> int:
    """Number of processes in the group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


# -- doing something once ----------------------------------------------------------------
# The stages of main_process_first: global rank 0; then the first rank of every other
# machine; then everyone else.
_STAGES = ("rank 0", "the first rank of each other machine", "the other ranks")


@contextmanager
def main_process_first() -> Iterator[bool]:
    """Run the block on rank 0 first, then on each other machine's first rank, then on the rest.

    For work whose result is left on disk (the layer cache): rank 0 builds it while the
    others wait; on a shared file system every other rank then finds it and loads it. Where
    each machine has its own disk, the first rank of each machine builds its copy (once per
    machine, never two processes racing on one folder), and its machine's other ranks load
    that. Yields whether this process is rank 0.

    If the block fails on any rank, every rank raises (naming the failed rank) instead of
    waiting forever or repeating work that cannot succeed.
    """
    if not is_distributed():
        yield True
        return
    rank = get_rank()
    my_stage = 0 if rank == 0 else 1 if get_local_rank() == 0 else 2
    for stage in range(my_stage):
        _end_stage(stage, None)
    try:
        yield rank == 0
    except BaseException as err:
        _end_stage(my_stage, f"{type(err).__name__}: {err}", own_error=True)
        raise
    for stage in range(my_stage, len(_STAGES)):
        _end_stage(stage, None)


def _end_stage(stage: int, failure: str | None, own_error: bool = False) -> None:
    # Every rank takes part in every stage's gather, so all ranks see the same failures
    # at the same point and stop together.
    outcomes: list = [None] * get_world_size()
    dist.all_gather_object(outcomes, failure)
    failed = [(rank, text) for rank, text in enumerate(outcomes) if text is not None]
    if failed and not own_error:
        rank, text = failed[0]
        raise RuntimeError(
            f"rank {get_rank()}: rank {rank} failed in a main-process-first block "
            f"(see rank {rank}'s log): {text}"
        )


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on rank 0 alone, its result (a picklable object) on every rank.

    If it raises on rank 0, the other ranks raise too, with rank 0's error, instead of
    waiting. In a single process it is just ``fn()``.
    """
    if not is_distributed():
        return fn()
    box: list = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn())
        except Exception as err:
            box[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank {get_rank()}: rank 0 failed (see its log): {value}")
    return value


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

    global _local_rank
    _local_rank = local_rank
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
