r"""Techniques composed in one model: ``<Base>_<Technique>_<Technique>``, e.g. ``SASRec_ReLand_REKI``
(SASRec with ReLand's retrieved rationale and item text, then REKI's HEIN-adapted knowledge) or
``DeepFM_REKI_LEARN`` (DeepFM with REKI's and LEARN's knowledge fields).

Each named technique builds its own knowledge store, as its one-technique variant would (its
settings, its store, its cache), and adds its own modules, entering the model as its
one-technique variant does:

- general and sequential models (the fused families, :mod:`recbole_llmk.model.fusion`): the fusions
  apply in the order of the name: an ID table the first fused is fused again by the second
  (``e'' = f2(f1(e, t1), t2)``), and a sequential model's sequence representation likewise on the
  user side;
- context-aware models and DIN/DIEN (the field families, :mod:`recbole_llmk.model.knowledge_fields`):
  each technique's HEIN adds its user and item fields (two per technique).

The modules a later technique adds are prefixed with its name (``reki_hein``, ``learn_knowledge``).
Every named technique's yaml defaults are loaded, in the same order; a setting they share
(``knowledge_control``, ``llm_*``, the encoder) applies to each. A name whose techniques enter the
model in different ways (DIN_REKI adds fields, DIN_ReLand fuses into ID tables) is refused before
any knowledge is built, as is any technique its one-technique variant refuses.
"""

from functools import lru_cache

from recbole.model.abstract_recommender import ContextRecommender

from recbole_llmk.model.fusion import FusedFamily, fused_family
from recbole_llmk.model.knowledge_fields import KnowledgeContext, KnowledgeDeepInterest
from recbole_llmk.model.technique import KnowledgeTechnique


class ComposedKnowledge(KnowledgeTechnique):
    """The techniques in ``parts`` (each one's mixin as its one-technique variant uses it, in the
    name's order), as one technique: every store built before the model, each technique's modules
    added in order (``technique.technique_parts``)."""

    parts: tuple = ()

    @classmethod
    def fused_sides(cls, config):
        return tuple(side for side in ("user", "item") if any(side in part.fused_sides(config) for part in cls.parts))

    @classmethod
    def build_store(cls, config, train_data):
        """Build (or reuse) each technique's store (``prepare_knowledge`` checks the model fits
        first); returns the last one built (each is in ``config["knowledge_stores"]``)."""
        if config["knowledge_store_path"]:
            raise ValueError(f"knowledge_store_path names one store folder, and {cls.__name__} builds one per technique "
                             f"({', '.join(cls.techniques)}): leave it unset; each store goes under knowledge_dir")
        store = None
        for part in cls.parts:
            store = part.build_store(config, train_data) or store
        return store

    @classmethod
    def knowledge_requests(cls, config, train_data):
        return {"all": [r for part in cls.parts for r in part.knowledge_requests(config, train_data)["all"]]}


@lru_cache(maxsize=None)
def composed_variant(base, techniques):
    """``<Base>_<T1>_<T2>...`` for a RecBole model class and technique names (``utils.TECHNIQUES``)."""
    from recbole_llmk.utils import TECHNIQUES, _load

    name = "_".join((base.__name__, *techniques))
    if len(set(techniques)) < len(techniques):
        raise ValueError(f"{name} names a technique twice; name each once (e.g. {base.__name__}_ReLand_REKI)")
    variants = []
    for technique in techniques:
        try:
            variants.append(_load(TECHNIQUES[technique])(base))
        except ValueError as error:  # its one-technique variant's refusal, under this name
            raise ValueError(str(error).replace(f"{base.__name__}_{technique} is not supported", f"{name} is not supported",
                                                1)) from None
    fused = [issubclass(variant, FusedFamily) for variant in variants]
    if any(fused) and not all(fused):
        fields = techniques[fused.index(False)]
        raise ValueError(f"{name} is not supported: {base.__name__}_{fields} adds knowledge fields and "
                         f"{base.__name__}_{techniques[fused.index(True)]} fuses into ID tables; compose techniques "
                         "that enter the model the same way")
    parts = tuple(variant.technique_part for variant in variants)
    attributes = {"__doc__": f"{base.__name__} with {', then '.join(techniques)} knowledge.\n\n{__doc__}",
                  "base_model_name": base.__name__, "__module__": __name__, "parts": parts,
                  "technique": "_".join(techniques), "techniques": tuple(techniques)}
    if all(fused):
        return type(name, (ComposedKnowledge, fused_family(base, name), base), attributes)
    if issubclass(base, ContextRecommender):
        return type(name, (base, ComposedKnowledge, KnowledgeContext), attributes)
    return type(name, (ComposedKnowledge, KnowledgeDeepInterest, base), attributes)
