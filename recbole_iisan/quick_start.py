"""Run a model on a dataset end to end: the Python API behind ``run_recbole_iisan.py``.

Deliberately does not import ``recbole.quick_start`` (it imports ray, which breaks on
numpy 2); the steps are RecBole's own, in RecBole's order, so a built-in model gives the
metrics stock RecBole gives for the same config and seed.
"""
from __future__ import annotations

import json
import os
from logging import getLogger

from recbole.utils import get_flops, init_logger, init_seed, set_color
from recbole.data.transform import construct_transform

from recbole_iisan.config import Config
from recbole_iisan.distributed import cpu_threads_per_rank, find_free_port, is_main_process
from recbole_iisan.utils import create_dataset, data_preparation, get_model, get_trainer, is_plugin_model


def _json_ready(result):
    return {k: float(v) for k, v in result.items()} if result else result


def run_recbole_iisan(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                      cmd_args=None):
    """Train and test ``model`` on ``dataset``; return RecBole's result dict plus ``efficiency``.

    The returned dict has ``model``, ``dataset``, ``best_valid_score``,
    ``valid_score_bigger``, ``best_valid_result``, ``test_result`` and ``efficiency``;
    when the config has ``result_file`` the same is written there as JSON.
    ``cmd_args`` are ``--key=value`` overrides with the highest precedence.
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict=config_dict, cmd_args=list(cmd_args or []))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)

    dataset_obj = create_dataset(config)
    logger.info(dataset_obj)
    train_data, valid_data, test_data = data_preparation(config, dataset_obj)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_obj = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model_obj)
    if not is_plugin_model(config["model"]):
        # Stock RecBole runs a forward pass here (which draws random numbers in train
        # mode); doing the same keeps built-in models bit-identical to stock runs.
        transform = construct_transform(config)
        flops = get_flops(model_obj, dataset_obj, config["device"], logger, transform)
        logger.info(set_color("FLOPs", "blue") + f": {flops}")

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model_obj)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved,
                                   show_progress=config["show_progress"])
    efficiency = trainer.efficiency()

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    logger.info(set_color("efficiency", "yellow") + f": {efficiency}")

    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "best_valid_score": float(best_valid_score),
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": _json_ready(best_valid_result),
        "test_result": _json_ready(test_result),
        "efficiency": efficiency,
    }
    if config["result_file"] and is_main_process():  # one writer across all machines
        write_result(result, config["result_file"])
    return result


def write_result(result: dict, path: str) -> None:
    """Write ``result`` as JSON, atomically (a crash never leaves half a file)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """RecBole's HyperTuning objective: one run, quietly, returning its result dict."""
    config_dict = dict(config_dict or {})
    config_dict.setdefault("show_progress", False)
    return run_recbole_iisan(config_file_list=config_file_list, config_dict=config_dict, saved=saved)


def run_recbole_iisan_ddp(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                          cmd_args=None, nproc=1, world_size=-1, ip="localhost", port=None,
                          group_offset=0, all_ranks=False):
    """``run_recbole_iisan`` in ``nproc`` processes on this machine, one rank each.

    ``world_size`` (default ``nproc``) counts the ranks of every machine; a machine runs
    ranks ``group_offset`` .. ``group_offset + nproc - 1`` and all meet at ``ip:port``
    (rank 0's machine). On one machine the port may be left out: a free one is taken.
    Each rank runs on its own GPU (``gpu_id``) or, without one, on the CPU with gloo.
    Returns the result of local rank 0 (metrics are gathered over all ranks), or with
    ``all_ranks`` the list of this machine's results by local rank. With ``nproc == 1``
    and no ``world_size`` it is a plain single-process run.
    """
    if nproc <= 1 and world_size <= 0:
        result = run_recbole_iisan(model=model, dataset=dataset, config_file_list=config_file_list,
                                   config_dict=config_dict, saved=saved, cmd_args=cmd_args)
        return [result] if all_ranks else result
    import torch.multiprocessing as mp

    world_size = nproc if world_size <= 0 else world_size
    if port is None:
        if world_size > nproc:
            raise ValueError("a run over several machines needs an explicit port, the same on every machine")
        port = find_free_port()
    launch = {"world_size": world_size, "nproc": nproc, "ip": ip, "port": int(port),
              "offset": group_offset}
    # A spawn queue, not a fork one: ranks are started with spawn (CUDA cannot be forked).
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_run_rank, nprocs=nproc, join=True,
             args=(model, dataset, config_file_list, dict(config_dict or {}, **launch), saved,
                   list(cmd_args or []), queue))
    results = {}
    while not queue.empty():
        local_rank, result = queue.get()
        results[local_rank] = result
    if all_ranks:
        return [results.get(rank) for rank in range(nproc)]
    return results.get(0)


def _run_rank(local_rank, model, dataset, config_file_list, config_dict, saved, cmd_args, queue):
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads_per_rank(config_dict["nproc"]))
    try:
        result = run_recbole_iisan(model=model, dataset=dataset, config_file_list=config_file_list,
                                   config_dict=dict(config_dict, local_rank=local_rank), saved=saved,
                                   cmd_args=cmd_args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    queue.put((local_rank, result))
