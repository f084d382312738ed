r"""ReLand: RecBole's general and sequential models with a retrieved LLM rationale (``<Base>_ReLand``).

Reference:
    Changxin Tian et al. "Integrating Large Language Models' Insights into Industrial
    Recommenders via a Controllable Reasoning Pool." RecSys 2024 (ReLand).

Knowledge (``techniques.reland``): every training user's retrieved seed rationale (Step 2) and
every item's description, encoded by the text encoder. Each side enters through a fusion of
:mod:`recbole_llmk.model.layers`, chosen by ``reland_user_fusion`` and ``reland_item_fusion``:

- ``attention``: the paper's fusion, ``e' = a1 e + a2 Linear(t)`` with softmax weights;
- ``gate`` (user default): ``e' = e + g ⊙ Linear(t)``, ``g`` starting at zero;
- ``concat`` (item default): ``e' = W [e; t]``, the paper's "+f_item" concatenation, ``W`` starting
  as ``[I | 0]``.

Deviation from the paper: the user side defaults to ``gate``, not the paper's attention. Both
defaults start as the ID-only model, so the knowledge can only be added by training; the
attention fusion starts near a 50/50 mix with a random projection of the text and halves the
gradient reaching the ID rows (``benchmarks/suites/reland_fusion_ml100k.yaml`` compares them).
Where they enter, one rule per family and side:

- user side (``reland_user_rationale``), general models: every user ID table of the model (a direct
  ``nn.Embedding`` child named ``*user*`` with a row per user) becomes a
  :class:`~recbole_llmk.model.layers.FusedEmbedding`, so ``e'_u`` is used wherever the model reads
  ``e_u`` (BPR's lookup, LightGCN/NGCF's graph propagation, both NeuMF towers);
- user side, sequential models: their ``forward`` gets no user id, so the variant remembers the
  batch's users in ``calculate_loss`` / ``predict`` / ``full_sort_predict`` and fuses the rationale
  into what ``forward`` returns, the sequence representation (every position, for models such as
  BERT4Rec that return all of them);
- item side (``reland_item_text``, the paper's "+f_item"): every item ID table likewise becomes a
  ``FusedEmbedding``, so full-sort evaluation, which reads the whole table, ranks fused items.

``reland_user_rationale: False`` gives the "+f_item" ablation; both False the ID-only model.
"""

from functools import lru_cache

import torch
from recbole.model.abstract_recommender import GeneralRecommender, SequentialRecommender
from torch import nn

from recbole_llmk.knowledge.history import split_fingerprint, training_dataset, training_interactions
from recbole_llmk.knowledge.store import KnowledgeStore, run_table
from recbole_llmk.model.layers import FusedEmbedding, make_fusion
from recbole_llmk.techniques.reland import uses_side

# General models without an ID table per user or item to fuse into, and why.
UNSUPPORTED = {
    "Pop": "not a learned model: it ranks by popularity",
    "ItemKNN": "not a learned model: item-item similarity counts",
    "EASE": "closed-form item-item weights, no embeddings",
    "SLIMElastic": "closed-form item-item weights, no embeddings",
    "ADMMSLIM": "closed-form item-item weights, no embeddings",
    "NCEPLRec": "closed-form projections, no embeddings",
    "FISM": "no user table: a user is the mean of its items' embeddings",
    "NAIS": "no user table: a user is an attention over its items' embeddings",
}


def id_tables(model, side, n):
    """Names of ``model``'s direct ``nn.Embedding`` children for ``side`` (``user``/``item``)
    with one row per id (or one more, e.g. BERT4Rec's mask token)."""
    return [name for name, module in model.named_children()
            if isinstance(module, nn.Embedding) and side in name and module.num_embeddings in (n, n + 1)]


def knowledge_tables(config, dataset):
    """The ReLand store's tables for the sides the run fuses, aligned to ``dataset``'s internal ids."""
    store = KnowledgeStore.open(config["knowledge_store"])
    store.check({"technique": "ReLand", "dataset": config["dataset"],
                 "split": split_fingerprint(training_interactions(dataset))})
    return {side: torch.from_numpy(run_table(store, config, dataset, side, side))
            for side in ("user", "item") if uses_side(config, side)}


def fitting_variants(base_name, exclude):
    """The other techniques' variants of ``base_name`` that resolve (e.g. DIN_REKI, DIN_LEARN)."""
    from recbole_llmk.utils import TECHNIQUES, get_model

    fits = []
    for technique in TECHNIQUES:
        if technique != exclude:
            try:
                get_model(f"{base_name}_{technique}")
            except ValueError:
                continue
            fits.append(f"{base_name}_{technique}")
    return fits


def fusion(config, side, dim, knowledge_dim):
    """The fusion ``reland_<side>_fusion`` names, for ``dim``-wide embeddings."""
    setting = f"reland_{side}_fusion"
    return make_fusion(config[setting], dim, knowledge_dim, setting)


def fuse_tables(model, config, side, table):
    names = id_tables(model, side, len(table))
    if not names:
        raise ValueError(f"{type(model).__name__} has no {side} ID embedding table to fuse ReLand knowledge into")
    for name in names:
        embedding = getattr(model, name)
        setattr(model, name, FusedEmbedding(embedding, table, fusion(config, side, embedding.embedding_dim,
                                                                     table.shape[1])))


class ReLandMixin:
    """Knowledge building shared by both families."""

    technique = "ReLand"

    @classmethod
    def prepare_knowledge(cls, config, train_data):
        if not (uses_side(config, "user") or uses_side(config, "item")):
            return None  # the ID-only ablation
        from recbole_llmk.techniques.reland import build_reland_knowledge

        cls.check_fits(config, train_data._dataset)
        store = build_reland_knowledge(config, train_data)
        config["knowledge_store"] = store.path
        return store

    @classmethod
    def knowledge_requests(cls, config, train_data):
        from recbole_llmk.techniques.reland import reland_requests

        return {"all": reland_requests(config, training_dataset(train_data))[1]().requests}

    @classmethod
    def check_fits(cls, config, dataset):
        """Refuse, before any knowledge is built (a behaviour model trains for minutes), a model
        without the ID tables the fusion needs: build the base model and look."""
        base = cls.__bases__[-1]
        model = base(config, dataset)
        sides = [side for side in ("user", "item") if uses_side(config, side)]
        if issubclass(cls, ReLandSequential):  # the user side fuses into forward's output; items are scored
            sides = ["item"]
        for side in sides:
            if not id_tables(model, side, dataset.num(config[f"{side.upper()}_ID_FIELD"])):
                others = fitting_variants(base.__name__, exclude="ReLand")
                raise ValueError(
                    f"{cls.__name__} is not supported: {base.__name__} has no {side} ID embedding table (a direct "
                    f"nn.Embedding attribute named *{side}* with a row per {side}) for ReLand's fusion. "
                    f"Checked before any knowledge was built."
                    + (f" What fits {base.__name__}: {', '.join(others)}." if others else ""))

    def _tables(self, config, dataset):
        if not (uses_side(config, "user") or uses_side(config, "item")):
            return None
        return knowledge_tables(config, dataset)


class ReLandGeneral(ReLandMixin, GeneralRecommender):
    """Placed before a general model in the MRO: fuses its ID tables once it is built."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        tables = self._tables(config, dataset)
        for side in ("user", "item"):
            if tables is not None and uses_side(config, side):
                fuse_tables(self, config, side, tables[side])


class ReLandSequential(ReLandMixin, SequentialRecommender):
    """Placed before a sequential model in the MRO: fuses item tables, and the batch users'
    rationales into the sequence representation ``forward`` returns."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._batch_users = None
        self.user_fusion = None
        tables = self._tables(config, dataset)
        if tables is None:
            return
        items = id_tables(self, "item", self.n_items)
        if not items:
            raise ValueError(f"{type(self).__name__} has no item ID embedding table")
        dim = getattr(self, items[0]).embedding_dim  # sequence representations are scored against it
        if uses_side(config, "item"):
            fuse_tables(self, config, "item", tables["item"])
        if uses_side(config, "user"):
            self.USER_ID = config["USER_ID_FIELD"]
            self.register_buffer("user_knowledge", tables["user"], persistent=False)
            self.user_fusion = fusion(config, "user", dim, tables["user"].shape[1])
            self.sequence_dim = dim

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        if self.user_fusion is None:
            return output
        users = self._batch_users
        if users is None or output.shape[0] != users.shape[0] or output.shape[-1] != self.sequence_dim:
            raise RuntimeError(
                f"{type(self).__name__}: ReLand fuses the rationale into forward's sequence representation, "
                "but forward was called outside calculate_loss/predict/full_sort_predict or returned "
                f"something else (shape {tuple(output.shape)})")
        return self.user_fusion(output, self.user_knowledge[users])

    def _with_users(self, method, interaction):
        self._batch_users = interaction[self.USER_ID] if self.user_fusion is not None else None
        try:
            return method(interaction)
        finally:
            self._batch_users = None

    def calculate_loss(self, interaction):
        return self._with_users(super().calculate_loss, interaction)

    def predict(self, interaction):
        return self._with_users(super().predict, interaction)

    def full_sort_predict(self, interaction):
        return self._with_users(super().full_sort_predict, interaction)


@lru_cache(maxsize=None)
def reland_variant(base):
    """``<Base>_ReLand`` for a RecBole model class."""
    name = base.__name__
    if name in UNSUPPORTED:
        raise ValueError(f"{name}_ReLand is not supported: {name} is {UNSUPPORTED[name]}.")
    if issubclass(base, SequentialRecommender):
        mixin = ReLandSequential
    elif issubclass(base, GeneralRecommender):
        mixin = ReLandGeneral
    else:
        raise ValueError(f"{name}_ReLand is not supported: ReLand augments RecBole's general and sequential "
                         f"models; {name} is a {base.type.name.lower()} model.")
    doc = f"{name} with ReLand knowledge (retrieved seed rationale and item text, fused into its embeddings).\n\n{__doc__}"
    return type(f"{name}_ReLand", (mixin, base), {"__doc__": doc, "base_model_name": name, "__module__": __name__})
