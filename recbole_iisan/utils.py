"""Lookup of models, trainers and datasets: the plugin's first, then RecBole's."""
from __future__ import annotations

import importlib
import importlib.util
import os

from recbole.data import data_preparation as recbole_data_preparation
from recbole.data import create_dataset as recbole_create_dataset
from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

# Plugin model name -> module. One file per model, named after the class.
PLUGIN_MODELS = {
    "IISANVersa": "recbole_iisan.model.iisan_versa",
    "IISAN": "recbole_iisan.model.iisan",
    "MMFullFT": "recbole_iisan.model.mm_full_ft",
    "MMAdapter": "recbole_iisan.model.mm_adapter",
    "MMLoRA": "recbole_iisan.model.mm_lora",
    "MMBitFit": "recbole_iisan.model.mm_bitfit",
    "MMFrozen": "recbole_iisan.model.mm_frozen",
}


def split_overrides(args: list[str]) -> dict[str, str]:
    """``--key=value`` command-line arguments as ``{key: "value"}`` (values left as text)."""
    overrides = {}
    for arg in args:
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not sep or not name:
            raise ValueError(f"unknown argument {arg!r}: config settings are --key=value")
        overrides[name] = value
    return overrides


def is_plugin_model(model_name: str) -> bool:
    return model_name in PLUGIN_MODELS


def get_model(model_name: str) -> type:
    """The model class for ``model_name``: a plugin model, else a RecBole built-in one."""
    if model_name in PLUGIN_MODELS:
        module = importlib.import_module(PLUGIN_MODELS[model_name])
        return getattr(module, model_name)
    if not _is_recbole_model_file(model_name):
        raise ValueError(
            f"unknown model '{model_name}': it is neither a recbole_iisan model "
            f"({', '.join(sorted(PLUGIN_MODELS))}) nor a RecBole 1.2.1 model "
            "(model names are case-sensitive, e.g. SASRec, GRU4Rec, BERT4Rec)"
        )
    try:
        return recbole_get_model(model_name)
    except AttributeError:  # right file, wrong case: e.g. "SASREC"
        raise ValueError(f"unknown model '{model_name}' (model names are case-sensitive)") from None


def _is_recbole_model_file(model_name: str) -> bool:
    # Looked up on disk: RecBole's own lookup imports every model family on the way,
    # including exlib_recommender, which fails without lightgbm/xgboost installed and
    # would hide a simple typo behind a ModuleNotFoundError.
    spec = importlib.util.find_spec("recbole.model")
    file_name = f"{model_name.lower()}.py"
    return any(
        os.path.isfile(os.path.join(root, family, file_name))
        for root in spec.submodule_search_locations
        for family in os.listdir(root)
    )


def get_trainer(model_type: ModelType, model_name: str) -> type:
    """The trainer class: the plugin's for its models, RecBole's (metered) otherwise."""
    from recbole_iisan.trainer import IISANTrainer, metered

    if model_name in PLUGIN_MODELS:
        return getattr(get_model(model_name), "trainer_class", IISANTrainer)
    return metered(recbole_get_trainer(model_type, model_name))


def _check_dataset_folder(config) -> None:
    folder = config["data_path"]
    if os.path.isdir(folder):
        return
    parent = os.path.dirname(os.path.normpath(folder))
    known = sorted(d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))) \
        if os.path.isdir(parent) else []
    raise FileNotFoundError(
        f"dataset '{config['dataset']}' not found: there is no folder {folder} "
        f"(data_path={parent!r} holds: {', '.join(known) or 'nothing'}). "
        "Give --data_path or create the atomic files there (see README, 'Your own data')."
    )


def create_dataset(config):
    """The dataset for ``config['model']``.

    Plugin models name their dataset class (``dataset_class``); a built-in sequential
    model gets the protocol dataset when a history cut or the IISAN train protocol is
    asked for, so it sees exactly the data a plugin model sees; otherwise RecBole decides.
    """
    _check_dataset_folder(config)
    model_class = get_model(config["model"])
    dataset_class = getattr(model_class, "dataset_class", None)
    if dataset_class is None and config["MODEL_TYPE"] == ModelType.SEQUENTIAL and (
        config["max_history_len"] or config["train_protocol"] == "iisan"
    ):
        from recbole_iisan.data.dataset import ProtocolSequentialDataset

        dataset_class = ProtocolSequentialDataset
    if dataset_class is None:
        return recbole_create_dataset(config)
    return dataset_class(config)


def data_preparation(config, dataset):
    """Split and wrap in RecBole's dataloaders; the dataset's ``build()`` applies the protocol."""
    return recbole_data_preparation(config, dataset)
