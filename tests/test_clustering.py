"""Clusterers for REKI's collective knowledge: size cap, determinism, streaming insert, round trip."""

import numpy as np
import pytest

from recbole_llmk.knowledge.clustering import ClusteringError, KMeansClusterer, StreamingKernelTree, make_clusterer
from recbole_llmk.techniques.reki import top_d_items

METHODS = [StreamingKernelTree, KMeansClusterer]


def random_points(n=600, d=24, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def blobs(n=600, d=16, k=6, seed=0, spread=0.15):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    truth = rng.integers(0, k, n)
    return (centers[truth] + spread * rng.normal(size=(n, d))).astype(np.float32), truth


def purity(labels, truth):
    return sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(truth)


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize("cap", [1, 7, 25, 80])
def test_every_cluster_respects_the_cap(cls, cap):
    X = random_points(300 if cap == 1 else 600)
    model = cls(max_cluster_size=cap, seed=1).fit(X)
    sizes = np.bincount(model.labels_)
    assert model.labels_.dtype == np.int64 and model.labels_.min() == 0
    assert sizes.max() <= cap
    assert (sizes > 0).all(), "labels of a fit are contiguous from 0"
    members = model.clusters()
    assert sorted(i for ids in members.values() for i in ids) == list(range(len(X)))


def test_kmeans_cap_holds_for_identical_points():
    """k-means cannot split copies of one point; the cap is enforced by chunking instead."""
    X = np.ones((250, 8), dtype=np.float32)
    sizes = np.bincount(KMeansClusterer(max_cluster_size=40).fit(X).labels_)
    assert sizes.max() <= 40 and sizes.sum() == 250


@pytest.mark.parametrize("cls", METHODS)
def test_deterministic_for_a_seed(cls):
    X = random_points()
    first = cls(max_cluster_size=30, seed=5).fit(X).labels_
    again = cls(max_cluster_size=30, seed=5).fit(X).labels_
    assert np.array_equal(first, again)
    others = [cls(max_cluster_size=30, seed=s).fit(X).labels_ for s in (6, 7)]
    assert any(not np.array_equal(first, o) for o in others)


@pytest.mark.parametrize("cls", METHODS)
def test_well_separated_blobs_are_recovered(cls):
    X, truth = blobs()
    model = cls(max_cluster_size=80, seed=0).fit(X)
    assert purity(model.labels_, truth) >= 0.99
    # the cap forces ~n/80 clusters at least; no shattering into tiny pieces either
    assert len(model.clusters()) <= 3 * int(np.ceil(len(X) / 80)) + 6


def test_tree_insert_changes_only_the_branch_it_lands_in():
    X = random_points(900, seed=2)
    new = random_points(30, seed=3)
    tree = StreamingKernelTree(max_cluster_size=25, seed=0).fit(X)
    untouched_points = 0
    for k in range(len(new)):
        labels_before = tree.labels_.copy()
        table_before = tree.node_table()
        label = tree.insert(new[k:k + 1], ids=[f"new{k}"])
        region = tree.last_changed_nodes_[0]
        inside = set(tree.subtree_points(region))
        outside = np.array([p for p in range(len(labels_before)) if p not in inside])
        assert np.array_equal(tree.labels_[outside], labels_before[outside])
        untouched_points += len(outside)
        # not rebuilt: every old node keeps its id; at most the landing node and a split leaf change
        # their links, and at most two nodes are appended
        table_after = tree.node_table()
        assert tree.n_nodes - len(table_before) <= 2
        changed = [v for v, row in enumerate(table_before) if table_after[v] != row]
        assert len(changed) <= 2
        assert label[0] == tree.labels_[-1] >= 0
        assert np.bincount(tree.labels_).max() <= 25
    assert untouched_points > 0.8 * len(new) * len(X), "each insert left most of the tree alone"


def test_kmeans_insert_assigns_to_the_nearest_cluster_and_splits_only_that_one():
    X, _ = blobs(n=300, k=3)
    model = KMeansClusterer(max_cluster_size=40, seed=0).fit(X)
    before = model.labels_.copy()
    near = X[:1] + 0.01
    label = model.insert(near, ids=["x"])[0]
    changed = np.flatnonzero(model.labels_[:len(before)] != before)
    assert set(before[changed]) <= {label} or len(changed) == 0
    for k in range(60):  # fill one cluster past the cap: it must split, the others stay
        model.insert(X[:1] + 0.001 * (k + 1), ids=[f"y{k}"])
        assert np.bincount(model.labels_).max() <= 40
    moved = np.flatnonzero(model.labels_[:len(before)] != before)
    assert len(set(before[moved])) <= 1


@pytest.mark.parametrize("cls", METHODS)
def test_save_and_load_round_trip(cls, tmp_path):
    X = random_points(400)
    ids = [f"item{i}" for i in range(len(X))]
    model = cls(max_cluster_size=30, seed=4).fit(X, ids=ids)
    model.save(tmp_path / "saved")
    assert not list((tmp_path / "saved").glob("*.pkl"))
    loaded = cls.load(tmp_path / "saved")
    assert np.array_equal(loaded.labels_, model.labels_)
    assert loaded.clusters() == model.clusters()
    if cls is StreamingKernelTree:
        assert loaded.node_table() == model.node_table()
    new = random_points(20, seed=9)
    new_ids = [f"new{i}" for i in range(20)]
    assert np.array_equal(loaded.insert(new, ids=new_ids), model.insert(new, ids=new_ids))
    assert loaded.clusters() == model.clusters()


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(ClusteringError, match="clusterer.json"):
        StreamingKernelTree.load(tmp_path)


def test_misuse_is_reported():
    tree = StreamingKernelTree()
    with pytest.raises(ClusteringError, match="not fitted"):
        tree.insert(random_points(2))
    tree.fit(random_points(50, d=8))
    with pytest.raises(ClusteringError, match="dimensions"):
        tree.insert(random_points(2, d=9))
    with pytest.raises(ClusteringError, match="unique"):
        tree.insert(random_points(1, d=8), ids=[0])
    with pytest.raises(ClusteringError, match="2-d"):
        KMeansClusterer().fit(np.zeros(5))


def test_make_clusterer_reads_the_config():
    config = {"cluster_method": None, "item_cluster_size": None, "user_cluster_size": 7, "seed": 3}
    item = make_clusterer(config, kind="item")
    user = make_clusterer(config, kind="user")
    assert isinstance(item, StreamingKernelTree) and item.max_cluster_size == 80 and item.seed == 3
    assert user.max_cluster_size == 7
    kmeans = make_clusterer({"cluster_method": "kmeans"}, kind="user")
    assert isinstance(kmeans, KMeansClusterer) and kmeans.max_cluster_size == 100
    with pytest.raises(ClusteringError, match="cluster_method"):
        make_clusterer({"cluster_method": "dbscan"})
    with pytest.raises(ClusteringError, match="kind"):
        make_clusterer({}, kind="both")


def test_top_d_items_counts_occurrences_and_breaks_ties_by_first_occurrence():
    histories = [
        ["a", "b", "c"],
        ["c", "d", "b"],
        ["e", "c", "f"],
        ["f", "g"],
    ]
    # counts: c 3, b 2, f 2, a 1, d 1, e 1, g 1; b is seen before f, a before d, e, g
    assert top_d_items(histories, d=4) == ["c", "b", "f", "a"]
    assert top_d_items(histories, d=100) == ["c", "b", "f", "a", "d", "e", "g"]
    assert top_d_items([], d=3) == []
    with pytest.raises(ValueError, match="d must be at least 1"):
        top_d_items(histories, d=0)
