r"""REKI: knowledge-augmented variants of RecBole's CTR models (``<Base>_REKI``).

Reference:
    Yunjia Xi et al. "Towards Open-World Recommendation with Knowledge Augmentation from Large
    Language Models." RecSys 2024 (KAR); journal version "REKI".

The knowledge vectors of the user and the target item (``techniques.reki``) pass through HEIN
into two augmented vectors of the backbone's embedding size, which join the backbone as two extra
feature fields and are trained jointly with it. One rule per backbone family says where they enter:

- context-aware models (``recbole.model.context_aware_recommender``): two more fields in
  ``embed_input_fields``, before the model sizes its layers by ``num_feature_field``;
- deep-interest models (DIN, DIEN), whose forward builds its DNN input internally: appended to the
  input of their final DNN (``dnn_mlp_layers``), as KAR does for DIN.
"""

from functools import lru_cache

import numpy as np

from recbole.model.abstract_recommender import ContextRecommender, SequentialRecommender

from recbole_llmk.knowledge.history import split_fingerprint, training_dataset, training_interactions
from recbole_llmk.knowledge.store import KnowledgeStore, pca_reduce, run_table
from recbole_llmk.model.layers import ConcatInput, KnowledgeFields

# Models that cannot take the knowledge fields through a generic hook, and why.
UNSUPPORTED = {
    "LR": "first-order only: it has no field embeddings for the augmented vectors to join",
    "FFM": "field-aware embedding tables of its own; extra fields would need a per-model rewrite",
    "FwFM": "its field-pair weight map is built from dataset field names and has no slot for added fields",
}
# Deep-interest models: forward(user, ..., next_items) ending in self.dnn_mlp_layers.
DEEP_INTEREST = ("DIN", "DIEN")


def knowledge_fields(model, config, dataset):
    """HEIN over this run's stored knowledge, aligned to ``dataset``'s internal ids.

    Each side reads the store kinds its technique wrote (``knowledge_kinds``: e.g. individual
    REKI ``user`` / ``item``; REKI-C adds cluster and history kinds), concatenated in that order."""
    store = KnowledgeStore.open(config["knowledge_store"])
    store.check({"technique": model.store_technique, "dataset": config["dataset"],
                 "split": split_fingerprint(training_interactions(dataset))})
    kinds = store.meta.get("knowledge_kinds") or {"user": ["user"], "item": ["item"]}
    tables = {side: [run_table(store, config, dataset, kind, side) for kind in kinds[side]] for side in kinds}
    if config["knowledge_pca_dim"]:  # one projection for every kind: they share the encoder's space
        reduced = pca_reduce(tables["user"] + tables["item"], config["knowledge_pca_dim"])
        tables = {"user": reduced[:len(tables["user"])], "item": reduced[len(tables["user"]):]}
    user_table, item_table = (np.concatenate(tables[side], axis=1) for side in ("user", "item"))
    return KnowledgeFields(user_table, item_table, config["embedding_size"], config)


class KnowledgeMixin:
    """What every knowledge-fields variant shares: prestoring. A technique's mixin adds
    ``technique`` (its yaml), ``store_technique`` (the store it reads) and ``prepare_knowledge``."""

    def prestore_knowledge(self, drop_adapter=False):
        """Precompute the augmented vectors of every user and item (REKI's deployment)."""
        self.knowledge.prestore(drop_adapter)


class REKIMixin(KnowledgeMixin):
    """REKI's knowledge: built from prompts (individual, collective or released) before the model."""

    technique = store_technique = "REKI"

    @classmethod
    def prepare_knowledge(cls, config, train_data):
        from recbole_llmk.techniques.reki import build_reki_knowledge

        store = build_reki_knowledge(config, training_dataset(train_data))
        config["knowledge_store"] = store.path
        return store

    @classmethod
    def knowledge_requests(cls, config, train_data):
        """``{kind: [Request]}`` this model's knowledge needs (for batch export/import)."""
        from recbole_llmk.techniques.reki import reki_requests

        return {"all": reki_requests(config, training_dataset(train_data))[1]().requests}


class KnowledgeContext(ContextRecommender):
    """Placed between a context-aware model and ContextRecommender in the MRO, so it runs inside
    the model's own ``super().__init__`` and the model sizes its layers for the two new fields."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.USER_ID, self.ITEM_ID = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
        self.knowledge = knowledge_fields(self, config, dataset)
        self.num_feature_field += 2
        if self.double_tower:  # one field joins each tower
            self.user_token_field_num += 1
            self.item_token_field_num += 1

    def embed_input_fields(self, interaction):
        sparse, dense = super().embed_input_fields(interaction)
        fields = self.knowledge(interaction[self.USER_ID], interaction[self.ITEM_ID])
        if self.double_tower:
            # token embeddings are ordered [user seq, item seq, user tokens, item tokens]
            cut = self.user_token_seq_field_num + self.item_token_seq_field_num + self.user_token_field_num - 1
            sparse = torch_cat([sparse[:, :cut], fields[:, :1], sparse[:, cut:], fields[:, 1:]])
        else:
            sparse = torch_cat([sparse, fields])
        return sparse, dense


class KnowledgeDeepInterest(SequentialRecommender):
    """Placed before DIN/DIEN in the MRO: widens their final DNN once they are built and feeds it
    the batch's augmented vectors."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.knowledge = knowledge_fields(self, config, dataset)
        self.dnn_mlp_layers = ConcatInput(self.dnn_mlp_layers, 2 * config["embedding_size"])

    def forward(self, user, *args):
        self.dnn_mlp_layers.fields = self.knowledge(user, args[-1])  # args[-1]: the target items
        try:
            return super().forward(user, *args)
        finally:
            self.dnn_mlp_layers.fields = None


def torch_cat(parts):
    import torch

    return torch.cat([p for p in parts if p is not None and p.shape[1] > 0], dim=1)


def knowledge_variant(base, mixin, suffix, doc):
    """``<Base>_<suffix>``: a RecBole CTR model class with two knowledge fields from ``mixin``'s store."""
    name = base.__name__
    if name in UNSUPPORTED:
        raise ValueError(f"{name}_{suffix} is not supported: {name} is {UNSUPPORTED[name]}.")
    if issubclass(base, ContextRecommender):
        bases = (base, mixin, KnowledgeContext)
    elif name in DEEP_INTEREST:
        bases = (mixin, KnowledgeDeepInterest, base)
    else:
        raise ValueError(f"{name}_{suffix} is not supported: it augments CTR models (RecBole's "
                         f"context-aware models, DIN and DIEN); {name} is a {base.type.name.lower()} model.")
    return type(f"{name}_{suffix}", bases, {"__doc__": doc, "base_model_name": name, "__module__": mixin.__module__})


@lru_cache(maxsize=None)
def reki_variant(base):
    """``<Base>_REKI`` for a RecBole model class."""
    doc = f"{base.__name__} with REKI knowledge (two augmented-vector fields from HEIN).\n\n{__doc__}"
    return knowledge_variant(base, REKIMixin, "REKI", doc)
