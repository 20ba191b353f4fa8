"""What every plugin model shares: items embedded from their content, a SASRec-style user
encoder, the three losses, full ranking with one item table per evaluation, and lean
checkpoints. A model supplies ``embed_items(unique_ids) -> [U, d]``; nothing else here
knows how items are represented.
"""
from __future__ import annotations

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from recbole_iisan.compat import autocast_dtype
from recbole_iisan.data.dataset import MultimodalSequentialDataset, modalities_of
from recbole_iisan.model.layers import UserEncoder, inbatch_softmax_loss, log_popularity

LOSS_TYPES = ("inbatch", "CE", "BPR")
FROZEN_PREFIX = "encoders."  # the backbones live under self.encoders


class ContentSequentialRecommender(SequentialRecommender):
    plugin_model = True
    dataset_class = MultimodalSequentialDataset
    # No ``input_type``: RecBole then derives it from loss_type (BPR -> pairwise, with
    # negatives sampled; CE -> pointwise), and the plugin's Config makes inbatch pointwise.

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self.loss_type = config["loss_type"]
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type '{self.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
        self.embedding_size = config["embedding_size"]
        self.item_side = dataset.item_side
        self.modalities = modalities_of(config)
        self.encoders = nn.ModuleDict()
        self.user_encoder = UserEncoder(
            dim=self.embedding_size, n_layers=config["n_layers"], n_heads=config["n_heads"],
            max_len=self.max_seq_length, dropout=config["hidden_dropout_prob"],
            inner_size=config["inner_size"], activation=config["hidden_act"],
            layer_norm_eps=config["layer_norm_eps"])
        if self.loss_type == "inbatch":
            self.register_buffer("log_pop", log_popularity(dataset.training_item_counts()),
                                 persistent=False)
        if self.loss_type == "BPR":
            self.bpr_loss = BPRLoss()
        self._item_table: torch.Tensor | None = None
        self.item_table_builds = 0  # how many times full ranking built the item table

    # -- items -------------------------------------------------------------------------
    def embed_items(self, unique_ids: torch.Tensor) -> torch.Tensor:
        """[U] sorted distinct item ids -> [U, d]."""
        raise NotImplementedError

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of item_ids (any shape): each distinct item is computed once."""
        unique, inverse = torch.unique(item_ids.reshape(-1), return_inverse=True)
        return self.embed_items(unique)[inverse].view(*item_ids.shape, self.embedding_size)

    def item_table(self) -> torch.Tensor:
        """[n_items, d]: every item's embedding, computed in chunks."""
        device = self.user_encoder.position_embedding.weight.device
        chunk = self.config["item_table_batch_size"]
        ids = torch.arange(self.n_items, device=device)
        return torch.cat([self.embed_items(ids[i:i + chunk]) for i in range(0, self.n_items, chunk)])

    # -- users and losses ----------------------------------------------------------------
    def forward(self, item_seq, item_seq_len):
        states = self.user_encoder(self.item_embeddings(item_seq), item_seq != 0)
        return self.gather_indexes(states, item_seq_len - 1)

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "inbatch":
            # The whole sequence (inputs + target), every position predicting the next.
            seq = torch.cat([item_seq, item_seq.new_zeros(len(item_seq), 1)], dim=1)
            seq.scatter_(1, item_seq_len.unsqueeze(1), pos_items.unsqueeze(1))
            embs = self.item_embeddings(seq)
            user_states = self.user_encoder(embs[:, :-1], seq[:, :-1] != 0)
            return inbatch_softmax_loss(user_states, embs, seq, self.log_pop)
        seq_output = self.forward(item_seq, item_seq_len)
        if self.loss_type == "CE":
            return nn.functional.cross_entropy(seq_output @ self.item_table().t(), pos_items)
        pos_neg = self.item_embeddings(torch.stack([pos_items, interaction[self.NEG_ITEM_ID]], dim=1))
        pos_score = (seq_output * pos_neg[:, 0]).sum(-1)
        neg_score = (seq_output * pos_neg[:, 1]).sum(-1)
        return self.bpr_loss(pos_score, neg_score)

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (seq_output * self.item_embeddings(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        if self._item_table is None:
            # RecBole calls this once per evaluation batch; the table is the same for all of
            # them, so it is built once per evaluation pass and dropped by train().
            device = seq_output.device
            with autocast_dtype(device, self.config["amp_dtype"]), \
                    torch.autocast(device.type, enabled=self._eval_autocast()):
                self._item_table = self.item_table().float()
            self.item_table_builds += 1
        return seq_output @ self._item_table.t()

    def _eval_autocast(self) -> bool:
        return bool(self.config["enable_amp"]) and self.user_encoder.position_embedding.weight.is_cuda

    def train(self, mode: bool = True):
        if mode:
            self._item_table = None
        return super().train(mode)

    # -- what the trainer asks -------------------------------------------------------------
    def _frozen_keys(self) -> set[str]:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k for k in self.state_dict() if k.startswith(FROZEN_PREFIX) and k not in trainable}

    def checkpoint_state_dict(self) -> dict:
        """Everything but the frozen backbone weights (trainable parts inside them stay)."""
        frozen = self._frozen_keys()
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_checkpoint_state_dict(self, state: dict) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in self._frozen_keys()]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint does not match {type(self).__name__}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (was it trained with another modality or encoder?)")
        self._item_table = None

    def frozen_backbone_parameters(self) -> int:
        """Backbone parameters the system uses but this process does not hold (cached mode)."""
        held = set(self.encoders)
        return sum(self.item_side.spec(m).n_params for m in self.modalities if m not in held)

    def cache_build_seconds(self) -> float | None:
        built = self.item_side.cache_build_seconds
        seconds = [built[m] for m in self.modalities if m in built]
        return sum(seconds) if seconds else None
