"""Datasets: the IISAN protocol on RecBole's sequential data, and the multimodal item side."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset

from recbole_iisan.data.cache import LayerCache, content_digest
from recbole_iisan.data.encoders import describe_encoder, load_encoder
from recbole_iisan.data.items import (blank_image, load_image, read_item_text, resolve_item_images,
                                      resolve_item_text)
from recbole_iisan.distributed import main_process_first

TRAIN_PROTOCOLS = ("iisan", "recbole")
_AUG_ORDER = "aug_order"  # position of a row in RecBole's augmentation order (user, time)


class ProtocolSequentialDataset(SequentialDataset):
    """RecBole's SequentialDataset with the paper's protocol as options.

    ``max_history_len``: keep only each user's last N interactions, before RecBole's
    filters run (the paper keeps the last max_len + 3 = 13).
    ``train_protocol``: ``recbole`` trains on every prefix of every history (RecBole's
    augmentation); ``iisan`` trains on one sample per user per epoch, the longest training
    prefix, and the model computes its loss at every position of that sequence.
    Validation and test are RecBole's leave-one-out in both cases.
    """

    def __init__(self, config):
        protocol = config["train_protocol"] or "recbole"
        if protocol not in TRAIN_PROTOCOLS:
            raise ValueError(
                f"train_protocol '{protocol}' is not one of {', '.join(TRAIN_PROTOCOLS)}"
            )
        self.train_protocol = protocol
        super().__init__(config)

    def _data_filtering(self):
        self._cut_histories()
        super()._data_filtering()

    def _cut_histories(self) -> None:
        keep_last = self.config["max_history_len"]
        if not keep_last:
            return
        if keep_last < 3:
            raise ValueError(f"max_history_len={keep_last}: leave-one-out needs at least 3 items")
        frame = self.inter_feat
        ordered = frame.sort_values([self.uid_field, self.time_field], kind="stable")
        rank_from_end = ordered.groupby(self.uid_field, sort=False).cumcount(ascending=False)
        kept = rank_from_end[rank_from_end < keep_last].index
        dropped = len(frame) - len(kept)
        self.inter_feat = frame.loc[frame.index.isin(kept)]
        self.logger.info(
            f"max_history_len={keep_last}: kept the last {keep_last} interactions of each user "
            f"({dropped} older interactions dropped)"
        )

    def data_augmentation(self):
        super().data_augmentation()
        self.inter_feat[_AUG_ORDER] = torch.arange(len(self.inter_feat))

    def build(self):
        datasets = super().build()
        if self.train_protocol == "iisan":
            datasets[0] = self._longest_prefix_per_user(datasets[0])
        return datasets

    def _longest_prefix_per_user(self, train_dataset):
        feat = train_dataset.inter_feat
        uids = feat[self.uid_field].numpy()
        order = np.lexsort((feat[_AUG_ORDER].numpy(), uids))
        sorted_uids = uids[order]
        is_last = np.r_[sorted_uids[1:] != sorted_uids[:-1], True]
        keep = torch.as_tensor(np.sort(order[is_last]))
        return train_dataset.copy(feat[keep])


# Which item modalities each model mode reads.
MODALITIES = {
    "intra_inter": ("text", "image"),
    "intra": ("text", "image"),
    "inter": ("text", "image"),
    "multimodal": ("text", "image"),
    "text": ("text",),
    "image": ("image",),
}
# Stands in the item list for an item whose image is missing under ``missing_image: blank``
# (None is reserved for the padding row, which is never encoded).
BLANK_IMAGE = "<blank image>"


def modalities_of(config) -> tuple[str, ...]:
    mode = config["modality"] or "intra_inter"
    if mode not in MODALITIES:
        raise ValueError(f"modality '{mode}' is not one of {', '.join(MODALITIES)}")
    return MODALITIES[mode]


class ItemSide:
    """Raw content and frozen-encoder states of every item, aligned to RecBole's ids.

    Row ``i`` of everything here belongs to internal item id ``i``; row 0 is RecBole's
    padding item (no content, all-zero states). Work is done lazily and once: the
    dataset copies RecBole makes for train/valid/test share one ItemSide.
    """

    def __init__(self, config, item_tokens, logger):
        self.config = config
        self.tokens = [str(t) for t in item_tokens]
        self.logger = logger
        self.modalities = modalities_of(config)
        folder = Path(config["data_path"])
        self.item_file = folder / f"{config['dataset']}.item"
        self.image_dir = Path(config["image_dir"]) if config["image_dir"] else folder / "images"
        self._raw: dict[str, list] = {}
        self._specs: dict = {}
        self._states: dict[str, np.ndarray] = {}
        self.cache_build_seconds: dict[str, float] = {}

    # -- raw content -------------------------------------------------------------------
    def raw_items(self, modality: str) -> list:
        """Per internal id: the text (str) or image (Path / BLANK_IMAGE); None for padding."""
        if modality not in self._raw:
            real = self.tokens[1:]
            if modality == "text":
                texts = read_item_text(self.item_file, list(self.config["text_fields"]),
                                       item_field=self.config["ITEM_ID_FIELD"],
                                       separator=self.config["text_separator"])
                values = resolve_item_text(real, texts, self.config["empty_text"], str(self.item_file))
            elif modality == "image":
                paths = resolve_item_images(real, self.image_dir, self.config["missing_image"])
                values = [BLANK_IMAGE if p is None else p for p in paths]
            else:
                raise ValueError(f"unknown item modality '{modality}'")
            self._raw[modality] = [None] + values
        return self._raw[modality]

    def raw_batch(self, modality: str, item_ids) -> list:
        """Encoder-ready raw inputs (str or PIL image) of the given internal ids."""
        raw = self.raw_items(modality)
        return [_materialise(raw[int(i)]) for i in item_ids]

    def batch_inputs(self, modality: str, item_ids, encoder) -> dict:
        """Tokenized text or preprocessed pixels for a batch, on the encoder's device
        (uncached mode, fine-tuning)."""
        return encoder.inputs_on_device(self.raw_batch(modality, item_ids))

    # -- encoders and the layer cache -------------------------------------------------------
    def encoder_options(self, modality: str) -> dict:
        c = self.config
        options = {"taps": c[f"{modality}_taps"], "n_groups": c["n_groups"],
                   "pooling": c[f"{modality}_pooling"], "dtype": c[f"{modality}_dtype"]}
        if modality == "text":
            options["max_length"] = c["text_max_length"]
        return options

    def spec(self, modality: str):
        """What the encoder outputs (taps, widths, parameter count), without loading weights."""
        if modality not in self._specs:
            self._specs[modality] = describe_encoder(
                modality, self.config[f"{modality}_encoder"], **self.encoder_options(modality))
        return self._specs[modality]

    def load_encoder(self, modality: str, device=None, **overrides):
        """The modality's encoder as configured; ``overrides`` replace encoder options
        (e.g. ``taps`` for a model that needs other layers than the cache's)."""
        # Loading draws random numbers (weight init before the checkpoint is read): fork the
        # generators so a run that loads a backbone (to build the cache, uncached, or to
        # fine-tune) trains exactly like one that does not (later trials, the other ranks).
        device = torch.device(device or self.config["device"])
        options = dict(self.encoder_options(modality), **overrides)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return load_encoder(modality, self.config[f"{modality}_encoder"], device=device, **options)

    def layer_cache(self, modality: str) -> LayerCache:
        raw = self.raw_items(modality)
        key_parts = {
            "encoder": self.spec(modality).fingerprint,
            "dtype": self.config["cache_dtype"],
            "items": content_digest(raw),
            "item_ids": content_digest(self.tokens[1:]),
            "n_items": len(raw),
        }
        return LayerCache(self.config["cache_dir"], modality, key_parts)

    def layer_states(self, modality: str) -> np.ndarray:
        """[n_items, n_taps, width] states, memory-mapped; built once (on rank 0) if absent."""
        if modality not in self._states:
            cache = self.layer_cache(modality)
            raw = self.raw_items(modality)

            def encoder_fn():
                encoder = self.load_encoder(modality)
                return lambda batch: encoder.encode([_materialise(x) for x in batch])

            with main_process_first():
                states = cache.load_or_build(
                    encoder_fn, raw, rebuild=bool(self.config["rebuild_cache"]),
                    batch_size=self.config["encode_batch_size"],
                    progress=bool(self.config["show_progress"]), desc=f"encoding {modality}")
            if cache.built:
                self.cache_build_seconds[modality] = cache.build_seconds
            self._states[modality] = states
        return self._states[modality]


def _materialise(raw):
    if raw is None:
        raise ValueError("the padding item has no content")
    if raw == BLANK_IMAGE:
        return blank_image()
    if isinstance(raw, Path):
        return load_image(raw)
    return raw


class MultimodalSequentialDataset(ProtocolSequentialDataset):
    """The protocol dataset plus each item's text and image (``item_side``).

    Text comes raw from the ``.item`` file's ``text_fields`` (joined with
    ``text_separator``), images from ``image_dir`` (default ``<dataset>/images/``).
    """

    def __init__(self, config):
        super().__init__(config)
        self.item_side = ItemSide(config, self.field2id_token[self.iid_field], self.logger)
        for modality in self.item_side.modalities:
            self.item_side.raw_items(modality)  # bad item data fails here, before any training

    def training_item_counts(self) -> torch.Tensor:
        """How often each item occurs in the training sequences ([item_num], for logQ).

        Under the iisan protocol a row is a user's whole training sequence (inputs and
        target); under RecBole's, rows are prefixes, so only targets are counted.
        """
        feat = self.inter_feat
        counts = torch.bincount(feat[self.iid_field], minlength=self.item_num)
        if self.train_protocol == "iisan":
            seq = feat[f"{self.iid_field}{self.config['LIST_SUFFIX']}"]
            length = feat[self.item_list_length_field]
            real = torch.arange(seq.shape[1]).unsqueeze(0) < length.unsqueeze(1)
            counts += torch.bincount(seq[real], minlength=self.item_num)
        return counts
