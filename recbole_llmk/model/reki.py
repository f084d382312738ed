r"""REKI: knowledge-augmented variants of RecBole's models (``<Base>_REKI``).

Reference:
    Yunjia Xi et al. "Towards Open-World Recommendation with Knowledge Augmentation from Large
    Language Models." RecSys 2024 (KAR); journal version "REKI".

The knowledge vectors of the user and the target item (``techniques.reki``) pass through HEIN
into two augmented vectors of the backbone's embedding size, trained jointly with the backbone.
Where they enter is :mod:`recbole_llmk.model.knowledge_fields`'s rule per backbone family (shared
with LEARN's features):

- context-aware models (``recbole.model.context_aware_recommender``): two more feature fields in
  ``embed_input_fields``, before the model sizes its layers by ``num_feature_field`` (the paper's
  setting);
- deep-interest models (DIN, DIEN), whose forward builds its DNN input internally: appended to the
  input of their final DNN (``dnn_mlp_layers``), as KAR does for DIN;
- general and sequential models (BPR, LightGCN, SASRec, ...), which have no feature fields: fused
  into their user and item ID embeddings (:mod:`recbole_llmk.model.fusion`, ``hein_fusion``).
  Deviation from the paper, which evaluates CTR models only: the augmented vector is added through
  a gate that starts at zero, so such a variant starts as its stock model and the knowledge enters
  where the model reads its IDs (graph models propagate it).
"""

from functools import lru_cache

from recbole_llmk.model.knowledge_fields import KnowledgeMixin, knowledge_variant


class REKIMixin(KnowledgeMixin):
    """REKI's knowledge: built from prompts (individual, collective or released) before the model."""

    technique = store_technique = "REKI"

    @classmethod
    def knowledge_plan(cls, config, dataset):
        from recbole_llmk.techniques.reki import reki_requests

        return reki_requests(config, dataset)


@lru_cache(maxsize=None)
def reki_variant(base):
    """``<Base>_REKI`` for a RecBole model class."""
    doc = f"{base.__name__} with REKI knowledge (two augmented-vector fields from HEIN).\n\n{__doc__}"
    return knowledge_variant(base, REKIMixin, "REKI", doc)
