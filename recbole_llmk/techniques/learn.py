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

from recbole_llmk.defaults import setting
from recbole_llmk.knowledge.descriptions import Describer
from recbole_llmk.knowledge.pipeline import KnowledgePlan, digest, store_settings

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
    backend = setting(config, "llm_backend")
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


# --- <Model>_LEARN: LEARN's embeddings as features of CTR models ----------------------------------
FEATURES = "LEARN-features"
CARRIED = ("text_encoder", "encoder_pooling", "encoder_batch_size", "encoder_max_length", "dataset_hook",
           "knowledge_dir", "knowledge_default")


def learn_features_plan(config, dataset):
    """Store settings and plan of ``<Model>_LEARN``'s knowledge: the user and item embeddings of a
    LEARN model trained by RecBole on this run's own split (``training_dataset`` ``dataset``).

    A user's embedding is the user tower's output after its last H *training* items; an item's is
    the item tower's embedding of its content (so items without interactions have one too). LEARN
    is sequential: the run's split must be one a sequential model reproduces (time-ordered), which
    is checked by split fingerprint before LEARN trains."""
    from recbole_llmk.knowledge.history import split_fingerprint, training_interactions

    if config["eval_args"].get("order") != "TO":
        ordered = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                   "mode": config["eval_args"].get("mode", "full")}  # the run's own evaluation mode kept
        raise ValueError(
            f"{config['model']} trains LEARN on the run's split, and LEARN (a sequential model) needs a "
            f"time-ordered one; this run's eval_args are {config['eval_args']}. Use e.g. "
            f"--eval_args=\"{ordered}\" (DIN and DIEN use a time-ordered split by default).")
    frame = training_interactions(dataset)
    overrides = {k: config[k] for k in CARRIED if config[k] is not None}
    overrides.update(config["learn_features_config"] or {}, epochs=setting(config, "learn_features_epochs"))
    settings = store_settings(config, FEATURES, split_fingerprint(frame), digest([TEXT_VERSION, overrides]))
    return settings, lambda: KnowledgePlan(requests=[], layout={}, vectors=learn_embeddings(config, frame, overrides))


def learn_embeddings(config, frame, overrides):
    """``{"user": (tokens, vectors), "item": (tokens, vectors)}`` from a LEARN model trained on ``frame``'s split."""
    import numpy as np
    import torch

    from recbole_llmk.knowledge.history import recent_histories
    from recbole_llmk.knowledge.pretrained import train_on_split

    _, dataset, _, net = train_on_split(config, frame, "LEARN", overrides)
    histories = recent_histories(frame, net.history_len)
    users = list(histories)
    seq = np.zeros((len(users), net.history_len), dtype=np.int64)
    lengths = np.zeros(len(users), dtype=np.int64)
    for row, user in enumerate(users):
        ids = dataset.token2id(dataset.iid_field, list(histories[user]["item"]))
        seq[row, :len(ids)], lengths[row] = ids, len(ids)
    with torch.no_grad():
        seq, lengths = torch.from_numpy(seq).to(net.device), torch.from_numpy(lengths).to(net.device)
        user_vectors = torch.cat([net._space(net.forward(seq[s:s + 4096], lengths[s:s + 4096]))
                                  for s in range(0, len(users), 4096)]).cpu().numpy()
        item_vectors = net._space(net.item_embeddings())[1:].cpu().numpy()
    items = [str(t) for t in dataset.field2id_token[dataset.iid_field][1:]]
    return {"user": (users, user_vectors), "item": (items, item_vectors)}
