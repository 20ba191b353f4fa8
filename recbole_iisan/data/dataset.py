"""Datasets: the IISAN protocol on RecBole's sequential data, and the multimodal item side."""
from __future__ import annotations

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset

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
