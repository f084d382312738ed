"""REKI / KAR knowledge: factorization prompting for user preferences and item facts.

Xi et al., "Towards Open-World Recommendation with Knowledge Augmentation from Large Language
Models" (KAR, RecSys 2024) and its journal version REKI. Individual knowledge: one prompt per
user (profile + recent *training* history + scenario factors) and one per item (description +
scenario factors). With ``llm_backend: none`` the descriptions themselves are the knowledge text.
"""

import json
import logging

import numpy as np

from recbole_llmk.defaults import setting
from recbole_llmk.knowledge.descriptions import Describer
from recbole_llmk.knowledge.history import split_fingerprint, training_interactions
from recbole_llmk.knowledge.pipeline import KnowledgePlan, digest, store_settings
from recbole_llmk.knowledge.prompts import PromptTemplate
from recbole_llmk.knowledge.release_assignment import (items_to_release, liked_and_disliked, load_release,
                                                        release_replay_file, release_settings, released_user_clusters)

TECHNIQUE = "REKI"


class REKIPrompts:
    """Builds REKI's user and item requests from descriptions and training histories."""

    def __init__(self, config, describer=None):
        self.describer = describer or Describer(config)
        self.hook = self.describer.hook
        self.user_template = PromptTemplate.load(setting(config, "reki_user_prompt"))
        self.item_template = PromptTemplate.load(setting(config, "reki_item_prompt"))
        self.factors = ", ".join(config["scenario_factors"] or self.hook.scenario_factors) or "any relevant factors"
        self.history_length = setting(config, "history_length")

    @property
    def digest(self):
        return digest([self.user_template.text, self.item_template.text, self.factors,
                       self.history_length, vars(self.hook)])

    def requests(self, dataset, frame):
        """``{"user": [...], "item": [...]}`` for every user and item id of ``dataset``."""
        from recbole_llmk.knowledge.generation import Request

        items = self.describer.describe("item")
        common = {"user_noun": self.hook.user_noun, "item_noun": self.hook.item_noun, "factors": self.factors}
        contexts = self.describer.user_contexts(frame, dataset.field2id_token[dataset.uid_field][1:], self.history_length)
        users = []
        for token, (profile, history) in contexts.items():
            prompt = self.user_template.render(profile=profile, history=history, **common)
            users.append(Request(f"user:{token}", prompt, self.describer.user_text(profile, history)))
        item_requests = []
        for token in dataset.field2id_token[dataset.iid_field][1:]:
            text = items.get(token) or f"{self.hook.item_noun} {token}"
            item_requests.append(Request(f"item:{token}", self.item_template.render(item=text, **common), text))
        return {"user": users, "item": item_requests}


MODES = ("individual", "collective", "released")


def reki_requests(config, dataset):
    """The store settings and knowledge plan of REKI for the training dataset ``dataset``.

    ``reki_knowledge``: ``individual`` (one prompt per user and item), ``collective`` (REKI-C: one
    prompt per cluster of items and of users, see ``collective_plan``) or ``released`` (collective
    knowledge somebody else generated, e.g. the REKI authors' gpt-3.5 answers for MovieLens-1M
    clusters, assigned to this dataset's users and items; see ``released_plan``)."""
    mode = setting(config, "reki_knowledge")
    if mode not in MODES:
        raise ValueError(f"reki_knowledge must be one of {MODES}, got '{mode}'")
    frame = training_interactions(dataset)
    prompts = REKIPrompts(config)
    settings = store_settings(config, TECHNIQUE, split_fingerprint(frame), prompts.digest)
    if mode == "individual":
        return settings, lambda: KnowledgePlan.individual(prompts.requests(dataset, frame))
    if mode == "collective":
        settings.update(mode=mode, clusters=digest({k: config[k] for k in COLLECTIVE_KEYS}
                                                   | {"seed": config["seed"], "items": "trained only"}))
        return settings, lambda: collective_plan(config, dataset, frame, prompts)
    release = load_release(config)
    settings.update(mode=mode, **release_settings(config, release))
    return settings, lambda: released_plan(config, dataset, frame, prompts, release)


COLLECTIVE_KEYS = ("cluster_method", "item_cluster_size", "user_cluster_size", "reki_cluster_model",
                   "reki_cluster_model_epochs", "reki_cluster_model_config", "reki_top_d", "reki_like_threshold",
                   "reki_item_cluster_prompt", "reki_user_cluster_prompt")
SIDES = {"user": ["user_positive", "user_negative", "user_history"], "item": ["item_cluster", "item_description"]}


def collective_plan(config, dataset, frame, prompts):
    """REKI-C: cluster items and users, prompt once per cluster.

    Items are clustered by their embeddings, users by the mean embedding of their recent
    training items joined with their own embedding, all from ``reki_cluster_model`` trained on
    this run's training split (REKI pretrains DIN; any general model with user and item vectors
    serves here). Clusters are capped (``item_cluster_size``, ``user_cluster_size``) and built by
    ``cluster_method``. An item cluster is prompted with its items; a user cluster with the top-d
    items of its members' training likes, and separately of their dislikes (REKI Eq. 1; likes and
    dislikes by ``reki_like_threshold`` when ratings exist, else every interaction is a like). As
    in REKI-C each user also gets its own history description and each item its description."""
    from recbole_llmk.knowledge.clustering import make_clusterer
    from recbole_llmk.knowledge.generation import Request
    from recbole_llmk.knowledge.history import recent_histories
    from recbole_llmk.knowledge.pretrained import pretrained_vectors

    vectors = pretrained_vectors(config, frame, setting(config, "reki_cluster_model"),
                                 setting(config, "reki_cluster_model_epochs"), config["reki_cluster_model_config"])
    item_tokens, item_vectors = vectors["item"]
    item_row = {t: r for r, t in enumerate(item_tokens)}
    # An item the training split never shows has only its random initial vector: clustered, it would
    # get an arbitrary cluster's knowledge and stand in that cluster's prompt. It keeps its description.
    trained = sorted(item_row[t] for t in set(frame["item"]) if t in item_row)
    user_row = {t: r for r, t in enumerate(vectors["user"][0])}
    histories = recent_histories(prompts.describer.with_ratings(frame), prompts.history_length)
    users = [u for u in histories if u in user_row]
    recent = np.stack([item_vectors[[item_row[i] for i in histories[u]["item"]]].mean(0) for u in users])
    user_points = np.concatenate([recent, vectors["user"][1][[user_row[u] for u in users]]], axis=1)
    clusters, files = {}, {}
    for kind, ids, points in (("item", [item_tokens[r] for r in trained], item_vectors[trained]),
                              ("user", users, user_points)):
        clusterer = make_clusterer(config, kind).fit(points, ids)
        clusters[kind] = {str(i): int(c) for i, c in zip(clusterer.ids, clusterer.labels_)}
        files[f"{kind}_clusters.json"] = json.dumps(clusterer.clusters(), default=str)
        files[f"{kind}_clusterer"] = clusterer.save  # the tree itself, ready for load_clusterer + insert
    likes = liked_and_disliked(frame, prompts.describer, {t: t for t in item_tokens}, config, every_like=True)
    describe = prompts.describer.describe("item")
    text = {t: describe.get(t) or f"{prompts.hook.item_noun} {t}" for t in item_tokens}
    item_template = PromptTemplate.load(setting(config, "reki_item_cluster_prompt"))
    user_template = PromptTemplate.load(setting(config, "reki_user_cluster_prompt"))
    common = {"user_noun": prompts.hook.user_noun, "item_noun": prompts.hook.item_noun, "factors": prompts.factors}
    requests = []
    for cluster, members in sorted(_members(clusters["item"]).items()):
        items = "\n".join(f"- {text[i]}" for i in members)
        requests.append(Request(f"item-cluster:{cluster}", item_template.render(items=items, **common), items))
    d = setting(config, "reki_top_d")
    for cluster, members in sorted(_members(clusters["user"]).items()):
        for side, sentiment, pick in (("positive", "liked", 0), ("negative", "disliked", 1)):
            top = top_d_items([likes.get(u, ([], []))[pick] for u in members], d)
            if top:
                items = "\n".join(f"- {text[i]}" for i in top)
                prompt = user_template.render(items=items, sentiment=sentiment, **common)
                requests.append(Request(f"{side}-cluster:{cluster}", prompt, items))
    keys = {r.key for r in requests}
    layout = {
        "user_positive": {u: f"positive-cluster:{c}" for u, c in clusters["user"].items() if f"positive-cluster:{c}" in keys},
        "user_negative": {u: f"negative-cluster:{c}" for u, c in clusters["user"].items() if f"negative-cluster:{c}" in keys},
        "item_cluster": {i: f"item-cluster:{c}" for i, c in clusters["item"].items()},
        "user_history": {u: f"user:{u}" for u in dataset.field2id_token[dataset.uid_field][1:]},
        "item_description": {i: f"item:{i}" for i in dataset.field2id_token[dataset.iid_field][1:]},
    }
    described = prompts.requests(dataset, frame)
    texts = {r.key: r.description for rs in described.values() for r in rs}
    n_individual = sum(map(len, described.values()))
    logging.getLogger().info(
        f"REKI-C: {len(_members(clusters['item']))} item clusters, {len(_members(clusters['user']))} user clusters "
        f"({setting(config, 'cluster_method')}): {len(requests)} prompts instead of {n_individual} individual ones; "
        f"{len(item_tokens) - len(trained)} items without training interactions are in no cluster (default vector)")
    return KnowledgePlan(requests, layout, texts, SIDES, postprocess=lambda answers: (answers, files))


def _members(assignment):
    groups = {}
    for token, cluster in assignment.items():
        groups.setdefault(cluster, []).append(token)
    return groups








def released_plan(config, dataset, frame, prompts, release):
    """REKI-C knowledge from a release: each user gets the answers of its liked-items and
    disliked-items clusters plus its own history description, each item its cluster's answer
    plus its own description (REKI-C's extra vectors). Items join clusters by ML-1M id or by
    title and year; users by ML-1M id, or by the overlap of their *training* likes and dislikes
    with each cluster's representative items. Released answers are replayed, never regenerated."""
    from recbole_llmk.knowledge.generation import Request
    from recbole_llmk.knowledge.reki_release import item_clusters_for

    items = list(dataset.field2id_token[dataset.iid_field][1:])
    users = list(dataset.field2id_token[dataset.uid_field][1:])
    to_ml1m = items_to_release(config, items, prompts.describer, release)
    item_cluster = item_clusters_for(to_ml1m, release)
    user_clusters = released_user_clusters(config, users, frame, prompts.describer, release, to_ml1m)
    replay = release_replay_file(config, release)
    requests = [Request(f"{kind}-cluster:{cluster}", release.prompts[(kind, cluster)], "")
                for kind, cluster in sorted(release.prompts, key=str)]
    layout = {
        "user_positive": {u: f"positive-cluster:{c[0]}" for u, c in user_clusters.items() if c and c[0] is not None},
        "user_negative": {u: f"negative-cluster:{c[1]}" for u, c in user_clusters.items() if c and c[1] is not None},
        "item_cluster": {i: f"item-cluster:{c}" for i, c in item_cluster.items() if c is not None},
        "user_history": {u: f"user:{u}" for u in users},
        "item_description": {i: f"item:{i}" for i in items},
    }
    logging.getLogger().info(
        f"released knowledge ({release.model}): {len(layout['item_cluster'])} of {len(items)} items and "
        f"{len(layout['user_positive'])}/{len(layout['user_negative'])} of {len(users)} users (liked/disliked) "
        f"assigned to released clusters; the rest get the default vector for those kinds")
    described = prompts.requests(dataset, frame)
    texts = {r.key: r.description for rs in described.values() for r in rs}
    return KnowledgePlan(requests, layout, texts, SIDES, backend={"llm_backend": "replay", "llm_replay_file": replay,
                                                                  "llm_model": release.model})


def top_d_items(histories, d=15):
    """REKI Eq. 1: the ``d`` items occurring most often in a user cluster's member histories.

    ``histories``: one list of item ids per member (their *training* interactions only, so that
    no test interaction reaches a prompt). Every occurrence counts. Ties are broken by first
    occurrence (members in the order given, each history in its order), so the result does not
    depend on hashing and a cluster prompt is stable from run to run."""
    if d < 1:
        raise ValueError(f"d must be at least 1, got {d}")
    counts, first_seen = {}, {}
    for history in histories:
        for item in history:
            if item not in counts:
                counts[item] = 0
                first_seen[item] = len(first_seen)
            counts[item] += 1
    ranked = sorted(counts, key=lambda item: (-counts[item], first_seen[item]))
    return ranked[:d]
