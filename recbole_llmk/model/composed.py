r"""Techniques composed in one model: ``<Base>_<Technique>_<Technique>``, e.g. ``SASRec_ReLand_REKI``
(SASRec with ReLand's retrieved rationale and item text, and REKI's HEIN-adapted knowledge).

Each named technique builds its own knowledge store, as its one-technique variant would (its
settings, its store, its cache), and adds its own fusion; the fusions apply in the order of the
name: an ID table the first fused is fused again by the second (``e'' = f2(f1(e, t1), t2)``), and a
sequential model's sequence representation likewise on the user side. Every named technique's
yaml defaults are loaded, in the same order; a setting they share (``knowledge_control``,
``llm_*``, the encoder) applies to each.

Served: general and sequential models, on which every named technique fuses into ID tables
(:mod:`recbole_llmk.model.fusion`). A context-aware model or DIN/DIEN takes one technique at a time
(``DeepFM_REKI``, ``DeepFM_LEARN``): their knowledge enters as fields of one HEIN, and composing
fields is not built. A model is refused before any knowledge is built, naming the technique that
does not fuse into it.
"""

from functools import lru_cache

from recbole.model.abstract_recommender import GeneralRecommender, SequentialRecommender

from recbole_llmk.model.fusion import FusedFamily, FusionTechnique, fitting_variants, fused_family
from recbole_llmk.model.technique import KnowledgeTechnique


class ComposedKnowledge(KnowledgeTechnique, FusionTechnique):
    """The techniques in ``parts`` (their fused mixins, in the name's order), as one technique:
    every store built before the model, every fusion applied in order (``FusedFamily.fusion_parts``)."""

    parts: tuple = ()

    @classmethod
    def fused_sides(cls, config):
        return tuple(side for side in ("user", "item") if any(side in part.fused_sides(config) for part in cls.parts))

    @classmethod
    def prepare_knowledge(cls, config, train_data):
        """Check that the model fits every technique, then build (or reuse) each technique's store;
        returns the last one built (each is in ``config["knowledge_stores"]``)."""
        cls.check_fits(config, train_data._dataset)
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
    alone = fitting_variants(base.__name__, exclude=())
    fits = f" What fits {base.__name__}: {', '.join(alone)}." if alone else ""
    compose_where = "techniques compose only where each fuses into ID tables (general and sequential models)."
    if not issubclass(base, (GeneralRecommender, SequentialRecommender)):
        raise ValueError(f"{name} is not supported: one technique at a time: a {base.type.name.lower()} model takes "
                         f"knowledge as fields; {compose_where}{fits}")
    family = fused_family(base, name)
    parts = []
    for technique in techniques:
        variant = _load(TECHNIQUES[technique])(base)
        if not issubclass(variant, FusedFamily):
            raise ValueError(f"{name} is not supported: one technique at a time: {base.__name__}_{technique} adds "
                             f"knowledge fields; {compose_where}{fits}")
        parts.append(variant.__bases__[0])  # the technique's fused mixin
    doc = (f"{base.__name__} with {', then '.join(techniques)} knowledge, each fused into its embeddings in turn."
           f"\n\n{__doc__}")
    return type(name, (ComposedKnowledge, family, base),
                {"__doc__": doc, "base_model_name": base.__name__, "__module__": __name__, "parts": tuple(parts),
                 "technique": "_".join(techniques), "techniques": tuple(techniques)})
