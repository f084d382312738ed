r"""Knowledge fused into the ID embeddings of RecBole's general and sequential models.

One mechanism for every technique (ReLand's retrieved rationale, REKI's and LEARN's HEIN-adapted
vectors), one rule per family and side:

- user side, general models: every user ID table of the model (a direct ``nn.Embedding`` child
  named ``*user*`` with a row per user) becomes a :class:`~recbole_llmk.model.layers.FusedEmbedding`,
  so ``e'_u`` is used wherever the model reads ``e_u`` (BPR's lookup, LightGCN/NGCF's graph
  propagation, both NeuMF towers);
- user side, sequential models: their ``forward`` gets no user id, so the variant remembers the
  batch's users in ``calculate_loss`` / ``predict`` / ``full_sort_predict`` and fuses the user's
  knowledge into what ``forward`` returns, the sequence representation (every position, for models
  such as BERT4Rec that return all of them);
- item side: every item ID table likewise becomes a ``FusedEmbedding``, so full-sort evaluation,
  which reads the whole table, ranks fused items.

A technique's mixin, placed before :class:`FusedGeneral` / :class:`FusedSequential` in the MRO,
says what is fused and how (:class:`FusionTechnique`). Models without such tables are refused
before any knowledge is built (``check_fits``).
"""

from recbole.model.abstract_recommender import GeneralRecommender, SequentialRecommender
from torch import nn

from recbole_llmk.model.layers import HEIN, FusedEmbedding, adapted, adapted_once
from recbole_llmk.model.technique import technique_parts

# General models without an ID table per user or item to fuse into, and why.
NO_ID_TABLES = {
    "Pop": "not a learned model: it ranks by popularity",
    "ItemKNN": "not a learned model: item-item similarity counts",
    "EASE": "closed-form item-item weights, no embeddings",
    "SLIMElastic": "closed-form item-item weights, no embeddings",
    "ADMMSLIM": "closed-form item-item weights, no embeddings",
    "NCEPLRec": "closed-form projections, no embeddings",
    "FISM": "without a user table: a user is the mean of its items' embeddings",
    "NAIS": "without a user table: a user is an attention over its items' embeddings",
}


# Sequential models whose forward returns no single sequence representation for the user's
# knowledge to join, and what it returns (found by RecBole's own model tests, run through the plugin).
NO_SEQUENCE_REPRESENTATION = {
    "RepeatNet": "returns item probabilities from forward (a repeat/explore mixture), not a sequence representation",
    "SASRecCPR": "returns a list of sequence representations from forward, one per softmax head",
}


def id_tables(model, side, n):
    """Names of ``model``'s direct ID embedding children for ``side`` (``user``/``item``): an
    ``nn.Embedding`` (or one another technique already fused) with one row per id (or one more,
    e.g. BERT4Rec's mask token)."""
    return [name for name, module in model.named_children()
            if isinstance(module, (nn.Embedding, FusedEmbedding)) and side in name
            and module.num_embeddings in (n, n + 1)]


def fitting_variants(base_name, exclude):
    """The other techniques' variants of ``base_name`` that resolve and do not fuse into ID tables
    (which ``base_name`` lacks), e.g. DIN_REKI, DIN_LEARN."""
    from recbole_llmk.utils import TECHNIQUES, get_model

    fits = []
    for technique in TECHNIQUES:
        if technique not in exclude:
            try:
                variant = get_model(f"{base_name}_{technique}")
            except ValueError:
                continue
            if not issubclass(variant, FusedFamily):
                fits.append(f"{base_name}_{technique}")
    return fits


class FusionTechnique:
    """What a technique tells the fused families (its mixin implements it; class methods, so a
    model that composes several techniques asks each in turn):

    - ``fused_sides(config)``: the sides it fuses in this run;
    - ``fused_tables(config, dataset)``: ``{side: [n_ids, k] tensor}`` for those sides (the
      knowledge aligned to internal ids), or ``None`` for the ID-only model;
    - ``side_fusion(model, config, side, dim, knowledge_dims, prefix)``: ``(adapter, fusion)`` for
      that side: ``adapter`` (a trained module, or ``None``) maps a row of the side's table,
      ``fusion`` fuses a ``dim``-wide embedding with the result (``fusion(e, t) -> e'``).
      ``knowledge_dims`` is ``{side: k}`` of this technique's tables; a module the technique shares
      between sides is set on ``model`` under a name starting with ``prefix``.
    """

    @classmethod
    def fused_sides(cls, config):
        """The sides this run fuses (checked before any knowledge is built)."""
        return ("user", "item")

    @classmethod
    def fused_tables(cls, config, dataset):
        raise NotImplementedError

    @classmethod
    def side_fusion(cls, model, config, side, dim, knowledge_dims, prefix):
        raise NotImplementedError


def fuse_tables(model, config, part, prefix, side, tables):
    """Wrap every ``side`` ID table of ``model`` in a :class:`FusedEmbedding` of ``part``'s knowledge
    (a table another technique fused is wrapped again: fusions apply in the order of the name)."""
    table = tables[side]
    names = id_tables(model, side, len(table))
    if not names:
        raise ValueError(f"{type(model).__name__} has no {side} ID embedding table to fuse knowledge into")
    dims = {s: t.shape[1] for s, t in tables.items()}
    for name in names:
        embedding = getattr(model, name)
        adapter, fusion = part.side_fusion(model, config, side, embedding.embedding_dim, dims, prefix)
        setattr(model, name, FusedEmbedding(embedding, table, fusion, adapter))


class FusedFamily:
    """What both families share: the techniques they fuse (``technique_parts``), the check that
    refuses, before any knowledge is built (a behaviour model or an LLM may run for minutes), a
    model without the ID tables the fusion needs, and prestoring."""

    @classmethod
    def check_fits(cls, config, dataset):
        base = cls.__bases__[-1]
        if issubclass(cls, FusedSequential) and "user" in cls.fused_sides(config) \
                and base.__name__ in NO_SEQUENCE_REPRESENTATION:
            raise ValueError(f"{cls.__name__} is not supported: {base.__name__} {NO_SEQUENCE_REPRESENTATION[base.__name__]}, "
                             f"which the user's {cls.technique} knowledge would join. Checked before any knowledge was built.")
        model = base(config, dataset)
        sides = [s for s in cls.fused_sides(config) if s in cls.table_sides]
        for side in sides:
            if not id_tables(model, side, dataset.num(config[f"{side.upper()}_ID_FIELD"])):
                others = fitting_variants(base.__name__, exclude=cls.technique.split("_"))
                raise ValueError(
                    f"{cls.__name__} is not supported: {base.__name__} has no {side} ID embedding table (a direct "
                    f"nn.Embedding attribute named *{side}* with a row per {side}) for the fusion of "
                    f"{cls.technique} knowledge. Checked before any knowledge was built."
                    + (f" What fits {base.__name__}: {', '.join(others)}." if others else ""))

    def prestore_knowledge(self, drop_adapter=False):
        """Run every trained adapter (HEIN) once over its whole table and serve the output (REKI's
        deployment); ``drop_adapter``: delete the adapters' modules, now unused."""
        for module in self.modules():
            if isinstance(module, FusedEmbedding):
                module.prestore()
        if hasattr(self, "prestore_fused"):
            self.prestore_fused()
        if drop_adapter:
            for name, module in list(self.named_children()):
                if isinstance(module, HEIN):
                    delattr(self, name)


class FusedGeneral(FusedFamily, GeneralRecommender):
    """Placed before a general model in the MRO: fuses its ID tables once it is built."""

    table_sides = ("user", "item")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        for prefix, part in technique_parts(type(self)):
            tables = part.fused_tables(config, dataset)
            for side in (tables or {}):
                fuse_tables(self, config, part, prefix, side, tables)


class FusedSequential(FusedFamily, SequentialRecommender):
    """Placed before a sequential model in the MRO: fuses item tables, and the batch users'
    knowledge into the sequence representation ``forward`` returns (each technique's in turn:
    ``<prefix>user_knowledge``, ``<prefix>user_adapter``, ``<prefix>user_fusion``)."""

    table_sides = ("item",)  # the user side fuses into forward's output; items are scored

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._batch_users = None
        self.user_fusion = self.user_adapter = None
        self.user_prefixes = []
        for prefix, part in technique_parts(type(self)):
            tables = part.fused_tables(config, dataset)
            if tables is not None:
                self._fuse_part(config, part, prefix, tables)

    def _fuse_part(self, config, part, prefix, tables):
        items = id_tables(self, "item", self.n_items)
        if not items:
            raise ValueError(f"{type(self).__name__} has no item ID embedding table")
        dim = getattr(self, items[0]).embedding_dim  # sequence representations are scored against it
        if "item" in tables:
            fuse_tables(self, config, part, prefix, "item", tables)
        if "user" in tables:
            self.USER_ID = config["USER_ID_FIELD"]
            self.register_buffer(f"{prefix}user_knowledge", tables["user"], persistent=False)
            dims = {s: t.shape[1] for s, t in tables.items()}
            adapter, fusion = part.side_fusion(self, config, "user", dim, dims, prefix)
            setattr(self, f"{prefix}user_adapter", adapter)
            setattr(self, f"{prefix}user_fusion", fusion)
            self.user_prefixes.append(prefix)
            self.sequence_dim = dim

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        if not self.user_prefixes:
            return output
        users = self._batch_users
        if users is None or output.shape[0] != users.shape[0] or output.shape[-1] != self.sequence_dim:
            raise RuntimeError(
                f"{type(self).__name__}: the user's knowledge is fused into forward's sequence representation, "
                "but forward was called outside calculate_loss/predict/full_sort_predict or returned "
                f"something else (shape {tuple(output.shape)})")
        for prefix in self.user_prefixes:
            knowledge = adapted(getattr(self, f"{prefix}user_adapter"), getattr(self, f"{prefix}user_knowledge"), users)
            output = getattr(self, f"{prefix}user_fusion")(output, knowledge)
        return output

    def _with_users(self, method, interaction):
        self._batch_users = interaction[self.USER_ID] if self.user_prefixes else None
        try:
            return method(interaction)
        finally:
            self._batch_users = None

    def prestore_fused(self):
        """Adapt the user knowledge once, as the item tables do (``FusedEmbedding.prestore``)."""
        for prefix in self.user_prefixes:
            adapter = getattr(self, f"{prefix}user_adapter")
            if adapter is not None:
                knowledge = adapted_once(adapter, getattr(self, f"{prefix}user_knowledge"))
                setattr(self, f"{prefix}user_knowledge", knowledge)
                setattr(self, f"{prefix}user_adapter", None)

    def calculate_loss(self, interaction):
        return self._with_users(super().calculate_loss, interaction)

    def predict(self, interaction):
        return self._with_users(super().predict, interaction)

    def full_sort_predict(self, interaction):
        return self._with_users(super().full_sort_predict, interaction)


def fused_family(base, name):
    """The fused family of ``base`` (a RecBole model class), or a ValueError naming why none fits
    (``name``: the variant asked for)."""
    if base.__name__ in NO_ID_TABLES:
        raise ValueError(f"{name} is not supported: {base.__name__} is {NO_ID_TABLES[base.__name__]}.")
    if issubclass(base, SequentialRecommender):
        return FusedSequential
    if issubclass(base, GeneralRecommender):
        return FusedGeneral
    raise ValueError(f"{name} is not a fused variant: {base.__name__} is a {base.type.name.lower()} model.")


def fused_variant(base, technique_mixin, suffix, doc):
    """``<Base>_<suffix>`` for a general or sequential RecBole model: ``technique_mixin`` (a
    :class:`FusionTechnique`) before the family's mixin before ``base``."""
    family = fused_family(base, f"{base.__name__}_{suffix}")
    return type(f"{base.__name__}_{suffix}", (technique_mixin, family, base),
                {"__doc__": doc, "base_model_name": base.__name__, "__module__": technique_mixin.__module__,
                 "technique_part": technique_mixin})
