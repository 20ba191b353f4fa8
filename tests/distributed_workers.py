"""Rank bodies for tests/test_distributed.py, in a module light enough that each spawned
rank imports only torch and recbole_iisan.distributed (not RecBole or the test module)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from recbole_iisan import distributed


def staged_worker(rank: int, port: int, folder: str) -> None:
    """Two pretend machines: ranks 0, 1 on A and 2, 3 on B. Writes what each rank saw."""
    torch.distributed.init_process_group("gloo", rank=rank, world_size=4,
                                         init_method=f"tcp://127.0.0.1:{port}")
    distributed._local_rank = rank % 2
    log = Path(folder) / "order.log"

    def note(text):
        with log.open("a") as f:
            f.write(f"{rank} {text}\n")

    results = []
    try:
        with distributed.main_process_first() as is_main:
            note("start")
            time.sleep(0.3)  # the waiting ranks must be waiting, not racing ahead
            note("end")
        results.append(f"main={is_main}")
        results.append(distributed.run_on_main(lambda: f"from {distributed.get_rank()}"))
        try:
            distributed.run_on_main(lambda: 1 / 0)
        except Exception as err:  # noqa: BLE001  (what each rank sees is the test's subject)
            results.append(f"{type(err).__name__}: {err}")
        with distributed.main_process_first():
            if rank == 2:
                raise OSError("disk full")
    except Exception as err:  # noqa: BLE001
        results.append(f"{type(err).__name__}: {err}")
    finally:
        torch.distributed.destroy_process_group()
    (Path(folder) / f"rank{rank}.txt").write_text("\n".join(results))
