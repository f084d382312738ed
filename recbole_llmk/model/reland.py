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
Where each side enters is :mod:`recbole_llmk.model.fusion`'s rule, shared with REKI and LEARN.

``reland_knowledge_norm`` (a number) centres each side's encoded knowledge over its ids and
scales it to that mean row norm before the fusion
(:func:`recbole_llmk.techniques.reland.rescaled`); the default uses the
encoder's vectors as they are.

``reland_user_rationale: False`` gives the "+f_item" ablation; both False the ID-only model.
"""

from functools import lru_cache

import torch

from recbole_llmk.knowledge.history import split_fingerprint, training_interactions
from recbole_llmk.knowledge.store import KnowledgeStore, run_table
from recbole_llmk.model.fusion import FusionTechnique, fused_variant
from recbole_llmk.model.layers import make_fusion
from recbole_llmk.model.technique import KnowledgeTechnique, built_store_path
from recbole_llmk.techniques.reland import rescaled, uses_side


def fusion(config, side, dim, knowledge_dim):
    """The fusion ``reland_<side>_fusion`` names, for ``dim``-wide embeddings."""
    setting = f"reland_{side}_fusion"
    return make_fusion(config[setting], dim, knowledge_dim, setting)


class ReLandMixin(KnowledgeTechnique, FusionTechnique):
    """ReLand's knowledge, built before the model, fused by the model's family."""

    technique = store_technique = "ReLand"

    @classmethod
    def fused_sides(cls, config):
        return tuple(side for side in ("user", "item") if uses_side(config, side))

    @classmethod
    def knowledge_plan(cls, config, dataset):
        if not cls.fused_sides(config):
            return None  # the ID-only ablation
        from recbole_llmk.techniques.reland import reland_requests

        return reland_requests(config, dataset)

    @classmethod
    def fused_tables(cls, config, dataset):
        """The ReLand store's tables for the sides the run fuses, aligned to ``dataset``'s internal ids."""
        sides = cls.fused_sides(config)
        if not sides:
            return None
        store = KnowledgeStore.open(built_store_path(config, "ReLand"))
        store.check({"technique": "ReLand", "dataset": config["dataset"],
                     "split": split_fingerprint(training_interactions(dataset))})
        norm = config["reland_knowledge_norm"]
        return {side: torch.from_numpy(rescaled(run_table(store, config, dataset, side, side), norm)) for side in sides}

    @classmethod
    def side_fusion(cls, model, config, side, dim, knowledge_dims, prefix):
        return None, fusion(config, side, dim, knowledge_dims[side])


@lru_cache(maxsize=None)
def reland_variant(base):
    """``<Base>_ReLand`` for a RecBole general or sequential model class."""
    from recbole.model.abstract_recommender import GeneralRecommender, SequentialRecommender

    if not issubclass(base, (GeneralRecommender, SequentialRecommender)):
        raise ValueError(f"{base.__name__}_ReLand is not supported: {base.__name__} is a "
                         f"{base.type.name.lower()} model; ReLand fuses into the ID tables of general and "
                         f"sequential models (for CTR models: {base.__name__}_REKI, {base.__name__}_LEARN).")
    doc = (f"{base.__name__} with ReLand knowledge (retrieved seed rationale and item text, fused into its "
           f"embeddings).\n\n{__doc__}")
    return fused_variant(base, ReLandMixin, "ReLand", doc)
