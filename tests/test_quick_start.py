"""End-to-end runs through the plugin's entry points, compared with stock RecBole."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import QUICK, REPO
from recbole_iisan.config import properties_dir
from recbole_iisan.quick_start import run_recbole_iisan

SASREC = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
          "MAX_ITEM_LIST_LENGTH": 10, "epochs": 2, "train_neg_sample_args": None}

# Stock RecBole 1.2.1's run_recbole, step by step (recbole.quick_start itself imports ray,
# which does not import on numpy 2). The environment variable lets stock RecBole load its
# own best checkpoint on torch >= 2.6; it is set for this reference process only.
STOCK_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    for name, target in [("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)]:
        if not hasattr(np, name):
            setattr(np, name, target)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.transform import construct_transform
    from recbole.utils import init_seed, init_logger, get_model, get_trainer, get_flops
    from logging import getLogger
    config_dict = json.loads(sys.argv[1])
    sys.argv = sys.argv[:1]
    config = Config(model="SASRec", dataset="demo", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    get_flops(model, dataset, config["device"], getLogger(), construct_transform(config))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    print("RESULT" + json.dumps({"best": float(best), "test": {k: float(v) for k, v in test.items()}}))
""")


def _demo_yaml() -> dict:
    return yaml.safe_load((properties_dir() / "dataset" / "demo.yaml").read_text())


def test_sasrec_through_plugin_equals_stock_recbole(tmp_path, small_demo_path):
    config = dict(QUICK, **SASREC, data_path=str(small_demo_path))
    stock_config = dict(_demo_yaml(), **config, checkpoint_dir=str(tmp_path / "stock"))
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    proc = subprocess.run([sys.executable, "-c", STOCK_RUN, json.dumps(stock_config)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(proc.stdout.split("RESULT", 1)[1])

    ours = run_recbole_iisan("SASRec", "demo",
                             config_dict=dict(config, checkpoint_dir=str(tmp_path / "ours")))
    assert ours["test_result"] == stock["test"]
    assert ours["best_valid_score"] == stock["best"]
    assert ours["test_result"]["ndcg@10"] > 0


def test_cli_writes_result_json(tmp_path, small_demo_path):
    result_file = tmp_path / "out" / "r.json"
    cmd = [sys.executable, str(REPO / "run_recbole_iisan.py"), "-m", "SASRec", "-d", "demo",
           f"--data_path={small_demo_path}", f"--checkpoint_dir={tmp_path / 'saved'}",
           "--epochs=1", "--hidden_size=16", "--inner_size=16", "--n_layers=1", "--n_heads=1",
           "--show_progress=False", "--state=WARNING", f"--result_file={result_file}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert set(result) >= {"model", "dataset", "best_valid_score", "best_valid_result",
                           "test_result", "efficiency"}
    assert (result["model"], result["dataset"]) == ("SASRec", "demo")
    assert set(result["test_result"]) == {"hit@10", "ndcg@10"}
    assert 0 <= result["test_result"]["ndcg@10"] <= result["test_result"]["hit@10"] <= 1
    eff = result["efficiency"]
    assert eff["trainable_params"] == eff["total_params"] > 0
    assert eff["train_seconds_per_epoch"] > 0 and eff["eval_seconds"] > 0
    assert eff["peak_memory_mb"] > 0
    assert not list(result_file.parent.glob("*.tmp-*"))


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset 'nosuch' not found.*nosuch"):
        run_recbole_iisan("SASRec", "nosuch", config_dict=dict(QUICK, data_path=str(tmp_path)))


def test_builtin_sequential_model_gets_protocol_dataset(quick_config):
    from recbole_iisan.config import Config
    from recbole_iisan.data.dataset import ProtocolSequentialDataset
    from recbole_iisan.utils import create_dataset, data_preparation

    config = Config("SASRec", "demo", config_dict=dict(quick_config, max_history_len=6), cmd_args=[])
    dataset = create_dataset(config)
    assert isinstance(dataset, ProtocolSequentialDataset)
    per_user = dataset.inter_feat[dataset.uid_field].value_counts()  # before build(): a DataFrame
    assert per_user.max() == 6 and per_user.min() >= 5

    config = Config("SASRec", "demo", config_dict=dict(quick_config, train_protocol="iisan"),
                    cmd_args=[])
    train, valid, _ = data_preparation(config, create_dataset(config))
    users = train.dataset.inter_feat[config["USER_ID_FIELD"]]
    assert len(users) == len(set(users.tolist())) == len(valid.dataset.inter_feat)
    # the one training row per user is its longest prefix: with its target appended it ends
    # exactly where the validation input ends (right before the validation item)
    uid = config["USER_ID_FIELD"]

    def rows(feat):
        return {u: (seq[:n].tolist(), t) for u, seq, n, t in zip(
            feat[uid].tolist(), feat["item_id_list"], feat["item_length"].tolist(),
            feat["item_id"].tolist())}

    train_rows, valid_rows = rows(train.dataset.inter_feat), rows(valid.dataset.inter_feat)
    for u, (valid_input, _) in valid_rows.items():
        train_input, train_target = train_rows[u]
        assert (train_input + [train_target])[-len(valid_input):] == valid_input
