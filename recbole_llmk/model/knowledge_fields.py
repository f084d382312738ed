"""Knowledge through HEIN, for every technique whose knowledge is a pair of vectors per user and
item (REKI's, LEARN's embeddings as features): where the augmented vectors enter each RecBole
model family, and the variant classes that put them there.

One rule per backbone family:

- context-aware models (``recbole.model.context_aware_recommender``): two more feature fields in
  ``embed_input_fields``, before the model sizes its layers by ``num_feature_field`` (KAR's
  setting);
- deep-interest models (DIN, DIEN), whose forward builds its DNN input internally: appended to the
  input of their final DNN (``dnn_mlp_layers``), as KAR does for DIN;
- general and sequential models (BPR, LightGCN, SASRec, ...), which have no feature fields: fused
  into their user and item ID embeddings (:mod:`recbole_llmk.model.fusion`, ``hein_fusion``) through
  a gate that starts at zero, so such a variant starts as its stock model.

A technique supplies a mixin (its ``knowledge_plan``, :mod:`recbole_llmk.model.technique`) and calls
:func:`knowledge_variant`; ``model/reki.py`` and ``model/learn.py`` are the two that do.
"""

from functools import lru_cache

import numpy as np

import torch
from recbole.model.abstract_recommender import ContextRecommender, GeneralRecommender, SequentialRecommender

from recbole_llmk.knowledge.history import split_fingerprint, training_interactions
from recbole_llmk.knowledge.store import KnowledgeStore, pca_reduce, run_table
from recbole_llmk.model.fusion import FusionTechnique, fused_variant
from recbole_llmk.model.layers import HEIN, ConcatInput, HEINSide, KnowledgeFields, make_fusion
from recbole_llmk.model.technique import KnowledgeTechnique, built_store_path, technique_parts


# Models that cannot take the knowledge fields through a generic hook, and why.
UNSUPPORTED = {
    "LR": "first-order only: it has no field embeddings for the augmented vectors to join",
    "FFM": "field-aware embedding tables of its own; extra fields would need a per-model rewrite",
    "FwFM": "its field-pair weight map is built from dataset field names and has no slot for added fields",
}
# Deep-interest models: forward(user, ..., next_items) ending in self.dnn_mlp_layers.
DEEP_INTEREST = ("DIN", "DIEN")


def knowledge_tables(store_technique, config, dataset):
    """The run's stored knowledge as ``(user_table, item_table)``, aligned to ``dataset``'s
    internal ids.

    Each side reads the store kinds its technique wrote (``knowledge_kinds``: e.g. individual
    REKI ``user`` / ``item``; REKI-C adds cluster and history kinds), concatenated in that order."""
    store = KnowledgeStore.open(built_store_path(config, store_technique))
    store.check({"technique": store_technique, "dataset": config["dataset"],
                 "split": split_fingerprint(training_interactions(dataset))})
    kinds = store.meta.get("knowledge_kinds") or {"user": ["user"], "item": ["item"]}
    tables = {side: [run_table(store, config, dataset, kind, side) for kind in kinds[side]] for side in kinds}
    if config["knowledge_pca_dim"]:  # one projection for every kind: they share the encoder's space
        reduced = pca_reduce(tables["user"] + tables["item"], config["knowledge_pca_dim"])
        tables = {"user": reduced[:len(tables["user"])], "item": reduced[len(tables["user"]):]}
    return tuple(np.concatenate(tables[side], axis=1) for side in ("user", "item"))


def knowledge_fields(technique, config, dataset):
    """HEIN over this run's stored knowledge of ``technique``: two augmented-vector fields of a CTR model."""
    user_table, item_table = knowledge_tables(technique.store_technique, config, dataset)
    return KnowledgeFields(user_table, item_table, config["embedding_size"], config)


class KnowledgeMixin(KnowledgeTechnique):
    """What every HEIN technique (REKI's, LEARN's features) is: a technique whose knowledge is a
    pair of vectors per user and item; it adds the contract of :mod:`recbole_llmk.model.technique`."""


class KnowledgeFieldsFamily:
    """What the field families (context-aware models, DIN/DIEN) share: one :class:`KnowledgeFields`
    per technique (``knowledge``, then ``<technique>_knowledge`` for a composed model's later ones),
    each two fields, and prestoring."""

    def build_fields(self, config, dataset):
        self.knowledge_names = []
        for prefix, part in technique_parts(type(self)):
            setattr(self, f"{prefix}knowledge", knowledge_fields(part, config, dataset))
            self.knowledge_names.append(f"{prefix}knowledge")

    def knowledge_of(self, user, item):
        """Every technique's fields for the batch: ``[B, 2 * techniques, dim]``, user then item of each."""
        return torch.cat([getattr(self, name)(user, item) for name in self.knowledge_names], dim=1)

    def prestore_knowledge(self, drop_adapter=False):
        """Precompute the augmented vectors of every user and item (REKI's deployment)."""
        for name in self.knowledge_names:
            getattr(self, name).prestore(drop_adapter)


class KnowledgeFusion(FusionTechnique):
    """REKI's and LEARN's knowledge on general and sequential models: HEIN's augmented user and
    item vectors, trained with the model, fused into its ID embeddings by ``hein_fusion`` (gate by
    default: ``e' = e + g ⊙ HEIN(t)``, ``g`` from zero, so the variant starts as the stock model;
    where each side enters is :mod:`recbole_llmk.model.fusion`'s rule, shared with ReLand)."""

    @classmethod
    def fused_tables(cls, config, dataset):
        user, item = knowledge_tables(cls.store_technique, config, dataset)
        return {"user": torch.from_numpy(user), "item": torch.from_numpy(item)}

    @classmethod
    def side_fusion(cls, model, config, side, dim, knowledge_dims, prefix):
        name = f"{prefix}hein"  # one HEIN for both sides (its shared experts)
        if getattr(model, name, None) is None:
            setattr(model, name, HEIN.from_config(knowledge_dims["user"], knowledge_dims["item"], dim, config))
        hein = getattr(model, name)
        if hein.user_out.out_features != dim:
            raise ValueError(f"{type(model).__name__}: its {side} ID table is {dim}-wide and another "
                             f"{hein.user_out.out_features}-wide; one HEIN cannot serve both")
        return HEINSide(hein, side), make_fusion(config["hein_fusion"], dim, dim, "hein_fusion")



class KnowledgeContext(KnowledgeFieldsFamily, ContextRecommender):
    """Placed between a context-aware model and ContextRecommender in the MRO, so it runs inside
    the model's own ``super().__init__`` and the model sizes its layers for the new fields."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.USER_ID, self.ITEM_ID = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
        self.build_fields(config, dataset)
        added = len(self.knowledge_names)  # a user and an item field each
        self.num_feature_field += 2 * added
        if self.double_tower:  # each technique's user field joins the user tower, its item field the item tower
            self.user_token_field_num += added
            self.item_token_field_num += added

    def embed_input_fields(self, interaction):
        sparse, dense = super().embed_input_fields(interaction)
        fields = self.knowledge_of(interaction[self.USER_ID], interaction[self.ITEM_ID])
        if self.double_tower:
            # token embeddings are ordered [user seq, item seq, user tokens, item tokens]
            added = len(self.knowledge_names)
            cut = self.user_token_seq_field_num + self.item_token_seq_field_num + self.user_token_field_num - added
            sparse = torch_cat([sparse[:, :cut], fields[:, 0::2], sparse[:, cut:], fields[:, 1::2]])
        else:
            sparse = torch_cat([sparse, fields])
        return sparse, dense


class KnowledgeDeepInterest(KnowledgeFieldsFamily, SequentialRecommender):
    """Placed before DIN/DIEN in the MRO: widens their final DNN once they are built and feeds it
    the batch's augmented vectors."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.build_fields(config, dataset)
        self.dnn_mlp_layers = ConcatInput(self.dnn_mlp_layers, 2 * len(self.knowledge_names) * config["embedding_size"])

    def forward(self, user, *args):
        self.dnn_mlp_layers.fields = self.knowledge_of(user, args[-1])  # args[-1]: the target items
        try:
            return super().forward(user, *args)
        finally:
            self.dnn_mlp_layers.fields = None


def torch_cat(parts):
    return torch.cat([p for p in parts if p is not None and p.shape[1] > 0], dim=1)


def knowledge_variant(base, mixin, suffix, doc):
    """``<Base>_<suffix>``: a RecBole model class with ``mixin``'s stored knowledge through HEIN:
    two knowledge fields of a CTR model, or fused into a general or sequential model's ID embeddings."""
    name = base.__name__
    if name in UNSUPPORTED:
        raise ValueError(f"{name}_{suffix} is not supported: {name} is {UNSUPPORTED[name]}.")
    if issubclass(base, ContextRecommender):
        bases = (base, mixin, KnowledgeContext)
    elif name in DEEP_INTEREST:
        bases = (mixin, KnowledgeDeepInterest, base)
    elif issubclass(base, (GeneralRecommender, SequentialRecommender)):
        return fused_variant(base, fused_mixin(mixin), suffix, doc)
    else:
        raise ValueError(f"{name}_{suffix} is not supported: it augments RecBole's context-aware, general and "
                         f"sequential models; {name} is a {base.type.name.lower()} model.")
    return type(f"{name}_{suffix}", bases, {"__doc__": doc, "base_model_name": name, "__module__": mixin.__module__,
                                            "technique_part": mixin})


@lru_cache(maxsize=None)
def fused_mixin(mixin):
    """``mixin`` (a technique's knowledge) with HEIN fused into ID embeddings."""
    return type(f"{mixin.__name__}Fused", (KnowledgeFusion, mixin), {"__module__": mixin.__module__})
