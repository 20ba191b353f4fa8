"""Config layering and model lookup."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from recbole_iisan.compat import add_numpy_aliases
from recbole_iisan.config import Config, default_data_path, properties_dir
from recbole_iisan.utils import get_model


def test_properties_found_in_checkout():
    props = properties_dir()
    assert (props / "overall.yaml").is_file()
    assert (props / "dataset" / "demo.yaml").is_file()


def test_default_data_path_is_repo_dataset():
    c = Config("SASRec", "demo", cmd_args=[])
    assert Path(c["data_path"]) == Path(default_data_path()) / "demo"
    assert (Path(c["data_path"]) / "demo.inter").is_file()


def test_layers_in_precedence_order(tmp_path):
    # RecBole internal < overall.yaml < model yaml < dataset yaml < files < dict < command line
    c = Config("SASRec", "demo", cmd_args=[])
    assert c["hidden_size"] == 64                      # RecBole's SASRec.yaml
    assert c["train_protocol"] == "recbole"            # plugin overall.yaml
    assert c["user_inter_num_interval"] == "[5,inf)"   # plugin dataset yaml
    assert c["metrics"] == ["Hit", "NDCG"]             # plugin dataset yaml beats RecBole overall

    f1, f2 = tmp_path / "a.yaml", tmp_path / "b.yaml"
    f1.write_text(yaml.safe_dump({"hidden_size": 8, "learning_rate": 0.5, "epochs": 3, "topk": [5]}))
    f2.write_text(yaml.safe_dump({"learning_rate": 0.25}))
    c = Config("SASRec", "demo", config_file_list=[str(f1), str(f2)],
               config_dict={"epochs": 7, "train_batch_size": 33},
               cmd_args=["--train_batch_size=44", "--cache_dtype=float32"])
    assert c["topk"] == [5]                  # user file beats dataset yaml
    assert c["hidden_size"] == 8             # user file beats RecBole's model yaml
    assert c["learning_rate"] == 0.25        # later file beats earlier file
    assert c["epochs"] == 7                  # dict beats files
    assert c["train_batch_size"] == 44       # command line beats dict
    assert c["cache_dtype"] == "float32"     # command line beats overall.yaml


def test_plugin_model_yaml_layered_over_overall():
    pytest.importorskip("recbole_iisan.model.iisan_versa")
    c = Config("IISANVersa", "demo", cmd_args=[])
    assert c["train_protocol"] == "iisan"    # model yaml beats overall.yaml
    assert c["MAX_ITEM_LIST_LENGTH"] == 10


def test_cmd_args_are_explicit_and_checked():
    with pytest.raises(ValueError, match="--key=value"):
        Config("SASRec", "demo", cmd_args=["epochs=3"])
    with pytest.raises(ValueError, match="twice"):
        Config("SASRec", "demo", cmd_args=["--epochs=3", "--epochs=4"])


def test_numpy_aliases_only_added_where_missing(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(np, "float_", sentinel, raising=False)
    add_numpy_aliases()
    assert np.float_ is sentinel            # an existing name is never overwritten
    monkeypatch.delattr(np, "float_")
    add_numpy_aliases()
    assert np.float_ is np.float64          # a missing one is added


def test_get_model_plugin_first_then_recbole():
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert get_model("SASRec") is SASRec
    assert get_model("GRU4Rec").__name__ == "GRU4Rec"


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'SASRecc'.*IISANVersa"):
        get_model("SASRecc")
    with pytest.raises(ValueError, match="unknown model"):
        Config("NoSuchModel", "demo", cmd_args=[])


def test_neg_sampling_follows_loss_unless_given():
    assert Config("SASRec", "demo", cmd_args=[])["train_neg_sample_args"]["distribution"] == "none"
    bpr = Config("SASRec", "demo", config_dict={"loss_type": "BPR"}, cmd_args=[])
    assert bpr["train_neg_sample_args"]["distribution"] == "uniform"
