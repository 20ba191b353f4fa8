"""Trainers: RecBole's, made to run on today's torch, to meter efficiency and, for plugin
models, to save only what training changes."""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_iisan.compat import autocast_dtype, load_checkpoint
from recbole_iisan.distributed import broadcast_from_main, run_on_main, wrap_model
from recbole_iisan.efficiency import PeakMemory, count_parameters, mean, stopwatch


class MeteredTrainerMixin:
    """Adds to any RecBole trainer:

    - checkpoint loading that works on torch >= 2.6 (RecBole's pickled Config needs the
      full unpickler; see ``compat.load_checkpoint``), for resume and for the best model;
    - checkpoints of a model's ``checkpoint_state_dict()`` when it defines one, so frozen
      backbones are never written;
    - the efficiency meter: seconds per training epoch, evaluation seconds, peak memory.
    """

    def __init__(self, config, model):
        # RecBole wraps the model as DDP(device_ids=[local_rank]), which works on CUDA only:
        # let it build a single-process trainer, then wrap for the rank's own device.
        distributed = not config["single_spec"]
        if distributed:
            config["single_spec"] = True
            # RecBole's ensure_dir checks, then creates: ranks racing there crash.
            os.makedirs(config["checkpoint_dir"], exist_ok=True)
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = not distributed
        if distributed:
            self.distributed_model = wrap_model(self.model, config["device"])
            # Its name carries the local time; every rank names (and logs) rank 0's file.
            self.saved_model_file = broadcast_from_main(self.saved_model_file)
        self.epoch_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.peak_memory = PeakMemory(self.device)
        self.peak_memory_mb: float | None = None

    # -- checkpoints -------------------------------------------------------------------
    def _model_state(self) -> dict:
        if hasattr(self.model, "checkpoint_state_dict"):
            return self.model.checkpoint_state_dict()
        return self.model.state_dict()

    def _load_model_state(self, state: dict) -> None:
        if hasattr(self.model, "load_checkpoint_state_dict"):
            self.model.load_checkpoint_state_dict(state)
        else:
            self.model.load_state_dict(state)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self._model_state(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }
        torch.save(state, saved_model_file, pickle_protocol=4)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        self.saved_model_file = resume_file
        checkpoint = load_checkpoint(resume_file, map_location=self.device)
        if checkpoint["config"]["model"].lower() != self.config["model"].lower():
            raise ValueError(
                f"checkpoint {resume_file} was trained with model {checkpoint['config']['model']}, "
                f"not {self.config['model']}"
            )
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self._load_model_state(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def load_best_model(self, model_file=None) -> None:
        checkpoint_file = model_file or self.saved_model_file
        if self.config["single_spec"]:
            checkpoint = load_checkpoint(checkpoint_file, map_location=self.device)
        else:
            # Rank 0 alone wrote the checkpoint, possibly on a disk only its machine sees:
            # it reads it (once the file is complete) and sends the weights to every rank.
            checkpoint = run_on_main(lambda: _weights_only(load_checkpoint(checkpoint_file,
                                                                           map_location="cpu")))
        self._load_model_state(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")

    # -- metering ----------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False,
            callback_fn=None):
        self.peak_memory.reset()
        try:
            return super().fit(train_data, valid_data, verbose=verbose, saved=saved,
                               show_progress=show_progress, callback_fn=callback_fn)
        finally:
            self.peak_memory_mb = self.peak_memory.peak_mb()

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        with stopwatch(self.epoch_seconds), autocast_dtype(self.device, self.config["amp_dtype"]):
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func,
                                        show_progress=show_progress)

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            self.load_best_model(model_file)
        with stopwatch(self.eval_seconds):
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def efficiency(self) -> dict:
        """The efficiency figures of this run so far."""
        figures = count_parameters(self.model)
        figures["train_seconds_per_epoch"] = mean(self.epoch_seconds)
        figures["eval_seconds"] = mean(self.eval_seconds)
        figures["peak_memory_mb"] = self.peak_memory_mb
        figures["peak_memory_kind"] = "cuda_allocated" if self.peak_memory.on_cuda else "process_rss"
        if hasattr(self.model, "cache_build_seconds"):
            seconds = self.model.cache_build_seconds()
            if seconds:
                figures["cache_build_seconds"] = seconds
        return figures


def _weights_only(checkpoint: dict) -> dict:
    # What a rank needs to load the best model; the pickled Config and optimizer stay behind.
    return {"state_dict": checkpoint["state_dict"], "other_parameter": checkpoint.get("other_parameter")}


class IISANTrainer(MeteredTrainerMixin, Trainer):
    """Trainer for the plugin's models: optional per-group learning rates, trainable-only
    parameters handed to the optimizer."""

    def _build_optimizer(self, **kwargs):
        if "params" not in kwargs:
            groups = getattr(self.model, "optimizer_param_groups", None)
            kwargs["params"] = groups() if groups else [
                p for p in self.model.parameters() if p.requires_grad
            ]
        return super()._build_optimizer(**kwargs)


@lru_cache(maxsize=None)
def metered(trainer_class: type) -> type:
    """RecBole's ``trainer_class`` with the meter and the checkpoint fix mixed in."""
    if issubclass(trainer_class, MeteredTrainerMixin):
        return trainer_class
    return type(trainer_class.__name__, (MeteredTrainerMixin, trainer_class), {})
