"""The plugin's Config: RecBole's, with the plugin's yaml layered in and a CPU-capable DDP set-up.

Precedence, lowest first: RecBole's internal yaml -> ``properties/overall.yaml`` ->
``properties/model/<Model>.yaml`` -> ``properties/dataset/<dataset>.yaml`` -> the user's
config files -> the config dict -> ``--key=value`` on the command line.
"""
from __future__ import annotations

import os
from pathlib import Path

from recbole.config import Config as RecBoleConfig
from recbole.utils import InputType

from recbole_iisan.compat import add_numpy_aliases
from recbole_iisan.distributed import init_rank

_PACKAGE_DIR = Path(__file__).resolve().parent


def properties_dir() -> Path:
    """Where the plugin's yaml lives.

    In a source checkout (and an editable install) it is the top-level ``properties/``;
    a built wheel carries a copy inside the package as ``recbole_iisan/properties/``
    (see setup.py), because a wheel cannot install files outside its packages.
    """
    for candidate in (_PACKAGE_DIR / "properties", _PACKAGE_DIR.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"recbole_iisan cannot find its properties/overall.yaml next to {_PACKAGE_DIR}; "
        "the installation is incomplete"
    )


def default_data_path() -> str:
    """The repo's ``dataset/`` in a checkout; ``./dataset/`` for an installed wheel."""
    repo_datasets = _PACKAGE_DIR.parent / "dataset"
    if (repo_datasets / "make_demo.py").is_file():
        return str(repo_datasets)
    return "dataset/"


class Config(RecBoleConfig):
    """RecBole's Config, aware of the plugin's models, yaml and device set-up.

    ``cmd_args``: the ``--key=value`` overrides to apply. ``None`` reads ``sys.argv`` as
    RecBole does; the plugin's own entry points always pass a list, so that calling the
    Python API from pytest or a notebook never picks up unrelated command-line flags.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None,
                 cmd_args: list[str] | None = None):
        self._cmd_args = cmd_args
        super().__init__(model=model, dataset=dataset, config_file_list=config_file_list,
                         config_dict=config_dict)

    def _load_cmd_line(self):
        if self._cmd_args is None:
            return super()._load_cmd_line()
        overrides = {}
        for arg in self._cmd_args:
            name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
            if not sep or not name:
                raise ValueError(f"command-line override '{arg}' is not of the form --key=value")
            if name in overrides and overrides[name] != value:
                raise ValueError(f"--{name} given twice with different values")
            overrides[name] = value
        return self._convert_config_dict(overrides)

    def compatibility_settings(self):
        # RecBole's own version assigns np.float_ & co., which numpy 2 removed.
        add_numpy_aliases()

    def _get_model_and_dataset(self, model, dataset):
        from recbole_iisan.utils import get_model

        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError(
                    "model must be given: as an argument, in a config file, in the config dict "
                    "or on the command line (-m MODEL)"
                )
        if isinstance(model, str):
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError(
                    "dataset must be given: as an argument, in a config file, in the config dict "
                    "or on the command line (-d DATASET)"
                )
        return model, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        # A plugin model's yaml is layered over those of the plugin models it derives from
        # (IISAN.yaml over IISANVersa.yaml), so a preset states only what differs.
        model_files = [props / "model" / f"{cls.__name__}.yaml"
                       for cls in reversed(model_class.__mro__)
                       if getattr(cls, "plugin_model", False) and cls.__name__ != model]
        for file in (
            props / "overall.yaml",
            *model_files,
            props / "model" / f"{model}.yaml",
            props / "dataset" / f"{dataset}.yaml",
        ):
            if file.is_file():
                loaded = self._update_internal_config_dict(str(file)) or {}
                if file.parent.name == "dataset":
                    self.parameters["Dataset"] += [
                        k for k in loaded if k not in self.parameters["Dataset"]
                    ]

    def _init_device(self):
        # RecBole's multi-process set-up is CUDA and nccl only; ours also runs ranks on the
        # CPU with gloo (see recbole_iisan.distributed). A single process is RecBole's.
        if "local_rank" not in self.final_config_dict:
            return super()._init_device()
        init_rank(self.final_config_dict)

    def _set_default_parameters(self):
        if "data_path" not in self.external_config_dict:
            self.final_config_dict["data_path"] = default_data_path()
        # RecBole's default samples one negative per positive, which its own check then
        # refuses for CE models; unless the user chose a sampler, the loss decides: BPR
        # samples, CE and the plugin's in-batch loss need none.
        if "train_neg_sample_args" not in self.external_config_dict:
            loss_type = str(self.final_config_dict.get("loss_type", "")).upper()
            if loss_type in ("CE", "INBATCH"):
                self.final_config_dict["train_neg_sample_args"] = None
        super()._set_default_parameters()
        if "MODEL_INPUT_TYPE" not in self.final_config_dict:
            # RecBole knows CE and BPR; the in-batch loss reads plain (pointwise) rows.
            self.final_config_dict["MODEL_INPUT_TYPE"] = InputType.POINTWISE
        if self.final_config_dict.get("cache_dir") is None:
            self.final_config_dict["cache_dir"] = os.path.join(
                self.final_config_dict["checkpoint_dir"], "layer_cache"
            )
