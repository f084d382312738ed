"""REKI-C with the plugin's own clusters: capped clusters, collective prompts from training data only."""

import json
import os
import re

import numpy as np
import pytest

from recbole_llmk.knowledge.clustering import load_clusterer
from recbole_llmk.knowledge.history import training_dataset, training_interactions
from recbole_llmk.knowledge.store import KnowledgeStore
from recbole_llmk.quick_start import prepare, run_recbole_llmk
from recbole_llmk.techniques.reki import reki_requests


@pytest.fixture
def collective_config(tiny_config):
    return dict(tiny_config, reki_knowledge="collective", reki_cluster_model_epochs=1,
                reki_cluster_model_config={"embedding_size": 8}, item_cluster_size=8, user_cluster_size=10,
                cluster_method="kmeans", reki_top_d=5)


@pytest.mark.parametrize("method", ["kmeans", "streakhc"])
def test_collective_knowledge_trains_with_capped_clusters_and_fewer_prompts(collective_config, method):
    result = run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=dict(collective_config, cluster_method=method))
    assert set(result["test_result"]) == {"auc", "logloss"}
    store = KnowledgeStore.open(result["knowledge_store"])
    assert store.meta["mode"] == "collective"
    assert sorted(store.meta["kinds"]) == ["item_cluster", "item_description", "user_history", "user_negative",
                                           "user_positive"]
    for kind, cap in (("item", 8), ("user", 10)):
        clusters = json.load(open(os.path.join(store.path, f"{kind}_clusters.json")))
        assert max(map(len, clusters.values())) <= cap and sum(map(len, clusters.values())) == {"item": 40, "user": 30}[kind]
        # the clusterer itself is kept: reloaded, it holds the same clusters and takes new members
        clusterer = load_clusterer(os.path.join(store.path, f"{kind}_clusterer"))
        assert json.loads(json.dumps(clusterer.clusters(), default=str)) == clusters
        width = (clusterer.kernel.centers if method == "streakhc" else clusterer._X).shape[-1]
        clusterer.insert(np.zeros((1, width), np.float32), ids=["newcomer"])
        assert sum(map(len, clusterer.clusters().values())) == sum(map(len, clusters.values())) + 1
    prompts = store.meta["generation"]["requested"]
    assert 40 / 8 + 30 / 10 <= prompts < 30 + 40  # at least one per cluster, far fewer than one per user and item


def test_collective_prompts_hold_only_training_interactions(collective_config):
    config, _, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=collective_config)
    dataset = training_dataset(train_data)
    frame = training_interactions(dataset)
    plan = reki_requests(config, dataset)[1]()
    user_cluster_of = plan.layout["user_history"]  # every user
    members = {}
    for side in ("user_positive", "user_negative"):
        for user, key in plan.layout[side].items():
            members.setdefault(key, set()).add(user)
    trained = frame.groupby("user")["item"].apply(set)
    checked = 0
    for request in plan.requests:
        if request.key.startswith(("positive", "negative")):
            shown = set(re.findall(r"Title(\d+) ", request.prompt))
            seen = set().union(*(trained[u] for u in members[request.key]))
            assert shown and shown <= seen  # every listed item is a member's *training* interaction
            checked += 1
    assert checked and len(user_cluster_of) == 30


def test_items_without_training_interactions_join_no_cluster(collective_config, workdir):
    """Their cluster-model vector is its random start: they get no cluster's knowledge and stand in no prompt."""
    with open(workdir / "data" / "tiny" / "tiny.item", "a") as f:
        f.writelines(f"{i}\tTitle{i} Story\t1990\tDrama\n" for i in range(41, 46))  # in no interaction
    config, _, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=collective_config)
    dataset = training_dataset(train_data)
    cold = {str(i) for i in range(41, 46)}
    assert cold <= set(dataset.field2id_token[dataset.iid_field])  # RecBole keeps them as items
    trained = set(training_interactions(dataset)["item"])
    assert not cold & trained
    plan = reki_requests(config, dataset)[1]()
    assert set(plan.layout["item_cluster"]) == trained
    assert cold <= set(plan.layout["item_description"])  # each still has its own description
    named = set().union(*(re.findall(r"Title(\d+) ", r.prompt) for r in plan.requests))
    assert named and not named & cold
