"""LEARN content embedding generation (CEG): item text encoded once by a frozen LLM.

Jia et al., "LEARN: Knowledge Adaptation from Large Language Model to Recommendation for Practical
Industrial Application" (AAAI 2025). The LLM is frozen and used only as an item content encoder:
each item's description (the dataset hook decides which fields: for movies title, year and genres;
for Amazon Beauty title, brand, categories and price) is encoded by ``text_encoder`` (any local
transformers model, encoder or decoder LLM, mean-pooled last hidden state) into a content
embedding. The embeddings go into a knowledge store (kind ``item``) built once and reused by every
later run, whatever its split: item content does not depend on user behaviour, so the store carries
no split fingerprint and no training interaction is ever read here.
"""

from recbole_llmk.knowledge.descriptions import Describer
from recbole_llmk.knowledge.pipeline import KnowledgePlan, digest, ensure_store, store_settings

TECHNIQUE = "LEARN"
# Bump when the way item texts are formed changes, so stores built the old way are not reused.
TEXT_VERSION = "learn-item-description-v1"


def item_texts(config, dataset, describer=None):
    """``{token: text}`` for every item of the dataset's ``.item`` file and every item id of
    ``dataset`` (an item without a description row is named by its token, so it still gets a
    vector)."""
    describer = describer or Describer(config)
    texts = dict(describer.describe("item"))
    noun = describer.hook.item_noun
    for token in dataset.field2id_token[dataset.iid_field][1:]:
        texts.setdefault(str(token), f"{noun} {token}")
    return texts


def learn_plan(config, dataset):
    """The store settings for LEARN's item content, and a function making its knowledge plan.

    The descriptions are the texts; nothing is generated, so ``llm_backend`` must be ``none``
    (LEARN's LLM is the frozen encoder, not a text generator)."""
    backend = config["llm_backend"] or "none"
    if backend != "none":
        raise ValueError(
            f"LEARN encodes item descriptions with a frozen LLM given as text_encoder; it generates no "
            f"text, so llm_backend must be 'none' (got '{backend}'). Point text_encoder at the LLM's "
            "local folder instead.")
    describer = Describer(config)
    texts = item_texts(config, dataset, describer)
    tokens = sorted(texts)
    settings = store_settings(config, TECHNIQUE, None,
                              digest([TEXT_VERSION, vars(describer.hook), digest(tokens)]))
    return settings, lambda: KnowledgePlan(requests=[], layout={"item": {t: f"item:{t}" for t in tokens}},
                                           texts={f"item:{t}": texts[t] for t in tokens})


def build_learn_knowledge(config, dataset):
    """The LEARN content store for ``dataset``'s items, built when missing."""
    return ensure_store(config, *learn_plan(config, dataset))
