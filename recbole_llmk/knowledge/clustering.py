"""Clusters of users and items for REKI's collective knowledge.

REKI (Xi et al.) does not prompt the LLM once per user and per item: it groups items (and users)
into clusters and asks once per cluster, so the number of calls is the number of clusters
(377 for ML-1M instead of ~10k). The authors build the clusters with StreaKHC (Han et al.,
"Streaming Hierarchical Clustering Based on Point-Set Kernel", KDD 2022) and cut the cluster tree so
that no cluster holds more than 80 items or 100 users. A user cluster is then described to the
LLM by the d items its members interacted with most (Eq. 1, :func:`top_d_items`).

Two clusterers with one API (``fit`` / ``labels_`` / ``clusters`` / ``insert`` / ``save`` /
``load``):

* :class:`StreamingKernelTree`: a StreaKHC-style tree, built one point at a time, so that new
  users and items can join the existing clusters without re-clustering (and without asking the
  LLM again about clusters they did not join).
* :class:`KMeansClusterer`: faiss k-means, the fast alternative, with the same size cap.

Both are deterministic for a given ``seed``. :func:`make_clusterer` picks one from the config
(``cluster_method``, ``item_cluster_size``, ``user_cluster_size``, ``seed``).
"""

import json
import math
import os

import numpy as np

from recbole_llmk.defaults import setting

METHODS = ("streakhc", "kmeans")


class ClusteringError(ValueError):
    """A clusterer was used wrongly (bad input, not fitted, unreadable saved state)."""


# --- shared helpers -----------------------------------------------------------------------------


def _as_matrix(X):
    """X as a C-contiguous float32 matrix with at least one row; faiss and our kernel need that."""
    X = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    if X.ndim != 2 or X.shape[0] == 0:
        raise ClusteringError(f"expected a non-empty 2-d array of points, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ClusteringError("the points contain NaN or infinite values")
    return X


def _jsonable_id(value):
    """Ids are saved in JSON: numpy scalars become Python ones; anything else must already be
    a string or a number."""
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, (str, int, float)):
        raise ClusteringError(f"ids must be strings or numbers to be saved, got {type(value).__name__}")
    return value


def _check_ids(ids, n, existing=()):
    """ids for n new points: 0.. by default; unique, and new relative to ``existing``."""
    if ids is None:
        start = len(existing)
        return list(range(start, start + n))
    ids = [_jsonable_id(i) for i in ids]
    if len(ids) != n:
        raise ClusteringError(f"got {len(ids)} ids for {n} points")
    taken = set(existing)
    if len(set(ids)) != n or taken.intersection(ids):
        raise ClusteringError("ids must be unique (and not already in the clustering)")
    return ids


def _clusters_of(ids, labels):
    """{cluster id: [member ids in point order]} for the non-empty clusters."""
    out = {}
    for point_id, label in zip(ids, labels):
        out.setdefault(int(label), []).append(point_id)
    return dict(sorted(out.items()))


def _read_state(path, name=None):
    """The JSON state of a saved clusterer (of class ``name``, when given), with a clear error
    when the folder is not one."""
    file = os.path.join(path, "clusterer.json")
    if not os.path.isfile(file):
        raise ClusteringError(f"{file} not found: {path} is not a saved {name or 'clusterer'}")
    with open(file, encoding="utf-8") as f:
        state = json.load(f)
    if name and state.get("class") != name:
        raise ClusteringError(f"{file} holds a {state.get('class')}, not a {name}")
    return state


def _write_state(path, state, arrays):
    """Plain JSON plus one .npy per array (loaded with allow_pickle=False): no pickle anywhere."""
    os.makedirs(path, exist_ok=True)
    for name, array in arrays.items():
        np.save(os.path.join(path, f"{name}.npy"), np.ascontiguousarray(array), allow_pickle=False)
    with open(os.path.join(path, "clusterer.json"), "w", encoding="utf-8") as f:
        json.dump(state, f)


def _load_array(path, name):
    file = os.path.join(path, f"{name}.npy")
    if not os.path.isfile(file):
        raise ClusteringError(f"{file} not found: the saved clusterer in {path} is incomplete")
    return np.load(file, allow_pickle=False)


# --- isolation kernel ---------------------------------------------------------------------------


class IsolationKernel:
    """The aNNE isolation kernel (Ting et al.), the kernel StreaKHC is built on.

    ``n_estimators`` times, ``psi`` points are drawn from the data; each draw splits the space
    into the Voronoi cells of its points. Two points are similar when they fall into the same cell
    in many draws. Cells are small where the data are dense and large where they are sparse, so
    the similarity adapts to local density: that is why StreaKHC finds clusters of varying
    densities where a fixed distance threshold would not. A point's feature is its cell index in
    each draw: ``transform`` returns an (n, n_estimators) integer matrix."""

    def __init__(self, n_estimators=64, psi=16, seed=0):
        if n_estimators < 1 or psi < 2:
            raise ClusteringError("the isolation kernel needs n_estimators >= 1 and psi >= 2")
        self.n_estimators = int(n_estimators)
        self.psi = int(psi)
        self.seed = seed
        self.centers = None  # (n_estimators, psi, d)

    def fit(self, X):
        X = _as_matrix(X)
        rng = np.random.default_rng(self.seed)
        psi = min(self.psi, X.shape[0])
        if psi < 2:  # one point: every draw is that point, all cells alike
            psi = 1
        picks = np.stack([rng.choice(X.shape[0], psi, replace=False) for _ in range(self.n_estimators)])
        self.centers = X[picks]
        return self

    @property
    def n_cells(self):
        return self.centers.shape[1]

    def transform(self, X, chunk=2048):
        """Cell index of every point in every draw; chunked so memory stays small for large n."""
        if self.centers is None:
            raise ClusteringError("the isolation kernel is not fitted")
        X = _as_matrix(X)
        t, psi, d = self.centers.shape
        if X.shape[1] != d:
            raise ClusteringError(f"points have {X.shape[1]} dimensions, the clustering was fitted on {d}")
        flat = self.centers.reshape(t * psi, d)
        center_norms = (flat * flat).sum(1)
        cells = np.empty((X.shape[0], t), dtype=np.int32)
        for begin in range(0, X.shape[0], chunk):
            block = X[begin:begin + chunk]
            # ||x - c||^2 up to the per-point constant ||x||^2, which does not change the argmin
            distances = center_norms[None, :] - 2.0 * (block @ flat.T)
            cells[begin:begin + chunk] = distances.reshape(len(block), t, psi).argmin(axis=2)
        return cells


# --- StreaKHC-style tree --------------------------------------------------------------------------


class StreamingKernelTree:
    """A cluster tree grown one point at a time (StreaKHC as REKI uses it), cut into clusters of at
    most ``max_cluster_size`` points.

    **Similarity.** A point ``x`` and a tree node holding the point set ``S`` are compared with the
    point-set kernel of the isolation kernel: the mean, over the ``n_estimators`` draws, of the
    share of ``S`` that falls into ``x``'s cell, i.e. ``<phi(x), mean phi(S)>`` in the kernel's
    feature space. Every internal node keeps the per-cell counts of its points, so this costs
    ``O(n_estimators)`` whatever the size of ``S`` (StreaKHC's "constant-time" point-set kernel),
    and the kernel, unlike a plain cosine, adapts to the local density of the data.

    **Insertion** (top-down, as in StreaKHC): starting at the root, the point moves into the most
    similar child as long as that child's similarity is at least ``threshold``; where no child is
    similar enough it becomes a new leaf beside them (a new sibling cluster); when it reaches a
    leaf, that leaf and the point become the two children of a new node. Only the nodes on that
    path change: their counts grow by one. Nothing is ever rebuilt.

    **Clusters** are the maximal subtrees with at most ``max_cluster_size`` points. Under a node
    that is too big, its small children are packed together in child order (next fit) up to the
    cap, so that a node with many single-point leaves gives a few full clusters rather than many
    singletons. Every cluster has at most ``max_cluster_size`` points.

    **insert** adds points to the fitted tree the same way. Only the clusters inside the subtree
    of one node per new point (``last_changed_nodes_``: the parent of the highest node on the path
    that grew past the cap, else the deepest node on the path that is over the cap) are recomputed;
    the labels of all other points stay exactly the same. The recomputed subtree reuses its own
    old cluster ids first (smallest first) and takes new ids (max + 1, ...) for any extra
    cluster; an id it no longer needs is left unused, never given to other points.

    **Determinism.** The kernel's draws and the insertion order (``fit`` shuffles the points with
    ``seed`` unless ``shuffle=False``; streaming results depend on the order) come from ``seed``.
    ``insert`` adds points in the order given. Ties go to the first child.

    **Parameters.** ``psi`` (cells per draw) and ``n_estimators`` (draws) set the kernel's
    resolution and cost. ``threshold``: a point joins a child only if it shares its cell with at
    least that share of the child's points, averaged over draws. Too high a threshold on data
    without clear structure attaches most points side by side under the root, and the clusters
    become arbitrary packs; 0.05 keeps the tree deep on unstructured data and recovers separated
    groups. A lone outlier under a big node can still end up as a tiny cluster (REKI's own ML-1M
    release has 16 single-item clusters out of 107). Cost: about 10 s for 10k points of 64 or
    384 dimensions on one CPU core, memory ``n_estimators * psi * 4`` bytes per internal node.
    """

    def __init__(self, max_cluster_size=80, n_estimators=64, psi=32, threshold=0.05, seed=0, shuffle=True):
        if int(max_cluster_size) < 1:
            raise ClusteringError(f"max_cluster_size must be at least 1, got {max_cluster_size}")
        self.max_cluster_size = int(max_cluster_size)
        self.n_estimators = int(n_estimators)
        self.psi = int(psi)
        self.threshold = float(threshold)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.kernel = None
        self.labels_ = None
        self.last_changed_nodes_ = []

    # -- public API --

    def fit(self, X, ids=None):
        """Build the tree from scratch on X (n, d); ``ids`` name the points (default 0..n-1)."""
        X = _as_matrix(X)
        self.ids = _check_ids(ids, X.shape[0])
        self.kernel = IsolationKernel(self.n_estimators, self.psi, self.seed).fit(X)
        self._reset(self.kernel.transform(X))
        order = np.random.default_rng(self.seed).permutation(len(self.ids)) if self.shuffle else range(len(self.ids))
        for point in order:
            self._insert_point(int(point))
        self._label_all()
        return self

    def insert(self, X_new, ids=None):
        """Add points to the fitted tree without rebuilding it; -> their cluster labels."""
        self._require_fitted()
        cells = self.kernel.transform(X_new)
        new_ids = _check_ids(ids, cells.shape[0], self.ids)
        first = len(self.ids)
        self.ids.extend(new_ids)
        self._cells = np.concatenate([self._cells, cells])
        self.labels_ = np.concatenate([self.labels_, np.full(len(new_ids), -1, dtype=np.int64)])
        self._leaf_of_point.extend([-1] * len(new_ids))
        self.last_changed_nodes_ = []
        for point in range(first, len(self.ids)):
            grown = self._insert_point(point)
            region = self._changed_region(grown)
            self._relabel(region)
            self.last_changed_nodes_.append(region)
        return self.labels_[first:].copy()

    def clusters(self):
        """{cluster id: [ids of its points]}."""
        self._require_fitted()
        return _clusters_of(self.ids, self.labels_)

    def subtree_points(self, node):
        """Indices (into ``ids``/``labels_``) of the points under ``node``."""
        return [int(self._point[leaf]) for leaf in self._leaves(node)]

    @property
    def n_nodes(self):
        return len(self._parent)

    def node_table(self):
        """(parent, children, point) of every node, for inspecting or comparing trees."""
        return [(self._parent[v], tuple(self._children[v]), int(self._point[v])) for v in range(self.n_nodes)]

    def save(self, path):
        """Save to the folder ``path``: clusterer.json (parameters, tree, ids, labels) + .npy arrays."""
        self._require_fitted()
        state = {
            "class": type(self).__name__,
            "params": {"max_cluster_size": self.max_cluster_size, "n_estimators": self.n_estimators,
                       "psi": self.psi, "threshold": self.threshold, "seed": self.seed, "shuffle": self.shuffle},
            "ids": self.ids,
            "labels": self.labels_.tolist(),
            "next_label": self._next_label,
            "parent": self._parent,
            "children": self._children,
            "point": self._point[:self.n_nodes].tolist(),
            "size": self._size[:self.n_nodes].tolist(),
            "row": self._row[:self.n_nodes].tolist(),
        }
        _write_state(path, state, {"centers": self.kernel.centers, "cells": self._cells,
                                   "counts": self._counts[:self._n_rows]})

    @classmethod
    def load(cls, path):
        """A tree saved by :meth:`save`, ready for ``insert``."""
        state = _read_state(path, cls.__name__)
        tree = cls(**state["params"])
        tree.kernel = IsolationKernel(tree.n_estimators, tree.psi, tree.seed)
        tree.kernel.centers = _load_array(path, "centers")
        tree.ids = list(state["ids"])
        tree.labels_ = np.asarray(state["labels"], dtype=np.int64)
        tree._next_label = int(state["next_label"])
        tree._parent = list(state["parent"])
        tree._children = [list(c) for c in state["children"]]
        tree._point = np.asarray(state["point"], dtype=np.int64)
        tree._size = np.asarray(state["size"], dtype=np.int64)
        tree._row = np.asarray(state["row"], dtype=np.int64)
        tree._cells = _load_array(path, "cells").astype(np.int32)
        counts = _load_array(path, "counts").astype(np.int32)
        tree._n_rows = counts.shape[0]
        tree._counts = counts
        tree._offsets = (np.arange(tree.kernel.centers.shape[0]) * tree.kernel.n_cells).astype(np.int64)
        tree._leaf_of_point = [-1] * len(tree.ids)
        for node, point in enumerate(tree._point.tolist()):
            if point >= 0:
                tree._leaf_of_point[point] = node
        return tree

    # -- tree storage --

    def _require_fitted(self):
        if self.labels_ is None:
            raise ClusteringError("the clusterer is not fitted: call fit(X) first")

    def _reset(self, cells):
        self._cells = cells
        n_cells = self.kernel.n_cells
        self._offsets = (np.arange(cells.shape[1]) * n_cells).astype(np.int64)
        self._counts = np.zeros((max(16, len(cells)), cells.shape[1] * n_cells), dtype=np.int32)
        self._n_rows = 0
        self._parent, self._children = [], []
        capacity = 2 * len(cells) + 1
        self._point, self._size, self._row = (np.zeros(capacity, dtype=np.int64) for _ in range(3))
        self._leaf_of_point = [-1] * len(cells)
        self._next_label = 0
        self.labels_ = np.full(len(cells), -1, dtype=np.int64)
        self._new_node(parent=-1, point=-1)  # the root: an internal node, empty at first

    def _new_node(self, parent, point):
        """Append a node (a leaf when ``point`` >= 0); internal nodes get a row of cell counts."""
        node = len(self._parent)
        if node == len(self._point):  # grow the node arrays (after inserts)
            self._point, self._size, self._row = (np.concatenate([a, np.zeros_like(a)])
                                                  for a in (self._point, self._size, self._row))
        self._parent.append(parent)
        self._children.append([])
        self._point[node] = point
        self._size[node] = 1 if point >= 0 else 0
        if point >= 0:
            self._row[node] = -1
            self._leaf_of_point[point] = node
        else:
            if self._n_rows == len(self._counts):
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            self._row[node] = self._n_rows
            self._n_rows += 1
        return node

    # -- insertion --

    def _similarities(self, point, children):
        """Point-set kernel similarity of ``point`` to each child (a leaf: share of equal cells)."""
        cells = self._cells[point]
        children = np.asarray(children)
        points = self._point[children]
        leaf = points >= 0
        sims = np.empty(len(children))
        if not leaf.all():
            internal = children[~leaf]
            rows = self._row[internal]
            gathered = self._counts[rows[:, None], (self._offsets + cells)[None, :]]
            sims[~leaf] = gathered.sum(1) / (self._size[internal] * float(len(cells)))
        if leaf.any():
            sims[leaf] = (self._cells[points[leaf]] == cells[None, :]).mean(1)
        return sims

    def _insert_point(self, point):
        """Put ``point`` into the tree; -> the internal nodes it now belongs to, root first."""
        node, path, split = 0, [0], None
        while True:
            children = self._children[node]
            if not children:
                self._attach(node, point)
                break
            sims = self._similarities(point, children)
            best = int(np.argmax(sims))
            if sims[best] < self.threshold:
                self._attach(node, point)  # no child is similar enough: a new sibling
                break
            child = children[best]
            if self._point[child] >= 0:
                split = self._split_leaf(child, best, point)
                break
            node = child
            path.append(node)
        rows = self._row[path]
        self._counts[rows[:, None], (self._offsets + self._cells[point])[None, :]] += 1
        for v in path:
            self._size[v] += 1
        return path + ([split] if split is not None else [])

    def _attach(self, node, point):
        leaf = self._new_node(parent=node, point=point)
        self._children[node].append(leaf)

    def _split_leaf(self, leaf, position, point):
        """Replace ``leaf`` by a new node whose children are ``leaf`` and the new point's leaf."""
        parent = self._parent[leaf]
        node = self._new_node(parent=parent, point=-1)
        self._children[parent][position] = node
        self._parent[leaf] = node
        new_leaf = self._new_node(parent=node, point=point)
        self._children[node] = [leaf, new_leaf]
        row = self._row[node]
        self._counts[row, self._offsets + self._cells[self._point[leaf]]] += 1
        self._counts[row, self._offsets + self._cells[point]] += 1
        self._size[node] = 2
        return node

    # -- cutting the tree into clusters --

    def _leaves(self, node):
        stack, leaves = [node], []
        while stack:
            v = stack.pop()
            if self._point[v] >= 0:
                leaves.append(v)
            else:
                stack.extend(reversed(self._children[v]))
        return leaves

    def _cut(self, node):
        """Clusters (lists of point indices) of the subtree of ``node``, in tree order."""
        cap = self.max_cluster_size
        if self._size[node] <= cap:
            return [self.subtree_points(node)] if self._size[node] else []
        clusters, stack = [], [node]
        while stack:
            v = stack.pop()
            packed, group, big = [], [], []
            for child in self._children[v]:
                size = self._size[child]
                if size > cap:
                    big.append(child)
                    continue
                if group and len(group) + size > cap:
                    packed.append(group)
                    group = []
                group.extend(self.subtree_points(child))
            if group:
                packed.append(group)
            clusters.extend(packed)
            stack.extend(reversed(big))
        return clusters

    def _label_all(self):
        self._next_label = 0
        self.labels_[:] = -1
        self._assign(self._cut(0), [])

    def _assign(self, clusters, reusable):
        """Give ``clusters`` the ids in ``reusable`` (smallest first), then fresh ones."""
        reusable = sorted(reusable)
        for k, members in enumerate(clusters):
            if k < len(reusable):
                label = reusable[k]
            else:
                label = self._next_label
                self._next_label += 1
            self.labels_[members] = label

    def _changed_region(self, path):
        """The node under which the insertion of one point may change clusters (see the class doc)."""
        cap = self.max_cluster_size
        for v in path:  # root first: the highest node that grew past the cap
            if self._size[v] == cap + 1 and self._row[v] >= 0:
                return self._parent[v] if self._parent[v] >= 0 else v
        over = [v for v in path if self._size[v] > cap]
        return over[-1] if over else 0

    def _relabel(self, region):
        points = self.subtree_points(region)
        old = {int(label) for label in self.labels_[points] if label >= 0}
        self._assign(self._cut(region), old)


# --- faiss k-means ------------------------------------------------------------------------------
def faiss_kmeans(X, k, seed=0, niter=25, threads=1):
    """``(labels, centroids)`` of faiss k-means of the rows of ``X`` into ``min(k, n)`` groups.

    ``threads``: see :class:`KMeansClusterer`."""
    import faiss

    X = _as_matrix(X)
    k = max(1, min(int(k), X.shape[0]))
    previous = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(int(threads))
    try:
        kmeans = faiss.Kmeans(X.shape[1], k, niter=int(niter), seed=int(seed), verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=1 << 30)
        kmeans.train(X)
        _, assigned = kmeans.index.search(X, 1)
    finally:
        faiss.omp_set_num_threads(previous)
    return assigned.ravel().astype(np.int64), kmeans.centroids.copy()



class KMeansClusterer:
    """faiss k-means with the same API and the same size cap as :class:`StreamingKernelTree`.

    ``k`` is ``ceil(n / max_cluster_size)`` unless ``n_clusters`` is given. k-means does not cap
    sizes by itself, so every cluster still over the cap is split again by k-means into
    ``ceil(size / max_cluster_size)`` parts, recursively; where k-means cannot split (identical
    points), the cluster is cut into equal chunks along its main direction. Cluster ids are
    numbered by their first point. ``insert`` assigns each new point to the nearest cluster
    centroid (centroids are member means, updated as points join); a cluster that grows past the
    cap is split in two and only its members may change labels (one half keeps the id, the
    other gets a new one). Deterministic for a given ``seed`` (faiss's k-means is seeded).

    ``threads``: OpenMP threads faiss may use during our calls (restored afterwards). One by
    default: REKI's problems are small (10k points cluster in well under a second on one core),
    and on a machine whose cores are busy, faiss's spinning OpenMP threads were measured 10x slower
    than one thread (2.4 s against 0.18 s for 10k points, k=125)."""

    def __init__(self, max_cluster_size=80, n_clusters=None, niter=25, seed=0, threads=1):
        if int(max_cluster_size) < 1:
            raise ClusteringError(f"max_cluster_size must be at least 1, got {max_cluster_size}")
        self.max_cluster_size = int(max_cluster_size)
        self.n_clusters = n_clusters
        self.niter = int(niter)
        self.seed = int(seed)
        self.threads = threads
        self.labels_ = None

    def fit(self, X, ids=None):
        X = _as_matrix(X)
        self.ids = _check_ids(ids, X.shape[0])
        self._X = X
        k = int(self.n_clusters or math.ceil(X.shape[0] / self.max_cluster_size))
        groups = self._split(np.arange(X.shape[0]), k, depth=0)
        groups = [g for g in groups if len(g)]
        groups.sort(key=lambda g: int(g.min()))
        self.labels_ = np.empty(X.shape[0], dtype=np.int64)
        for label, members in enumerate(groups):
            self.labels_[members] = label
        self._sums = np.stack([X[g].sum(0) for g in groups]).astype(np.float64)
        self._sizes = np.array([len(g) for g in groups], dtype=np.int64)
        return self

    def insert(self, X_new, ids=None):
        self._require_fitted()
        X_new = _as_matrix(X_new)
        if X_new.shape[1] != self._X.shape[1]:
            raise ClusteringError(f"points have {X_new.shape[1]} dimensions, the clustering was fitted on "
                                  f"{self._X.shape[1]}")
        new_ids = _check_ids(ids, X_new.shape[0], self.ids)
        first = len(self.ids)
        self.ids.extend(new_ids)
        self._X = np.concatenate([self._X, X_new])
        self.labels_ = np.concatenate([self.labels_, np.full(len(new_ids), -1, dtype=np.int64)])
        for point in range(first, len(self.ids)):
            centroids = self._sums / self._sizes[:, None]
            x = self._X[point].astype(np.float64)
            label = int(np.argmin(((centroids - x) ** 2).sum(1)))
            self.labels_[point] = label
            self._sums[label] += x
            self._sizes[label] += 1
            if self._sizes[label] > self.max_cluster_size:
                self._split_cluster(label)
        return self.labels_[first:].copy()

    def clusters(self):
        self._require_fitted()
        return _clusters_of(self.ids, self.labels_)

    def save(self, path):
        self._require_fitted()
        state = {"class": type(self).__name__,
                 "params": {"max_cluster_size": self.max_cluster_size, "n_clusters": self.n_clusters,
                            "niter": self.niter, "seed": self.seed, "threads": self.threads},
                 "ids": self.ids, "labels": self.labels_.tolist()}
        _write_state(path, state, {"points": self._X, "sums": self._sums, "sizes": self._sizes})

    @classmethod
    def load(cls, path):
        state = _read_state(path, cls.__name__)
        model = cls(**state["params"])
        model.ids = list(state["ids"])
        model.labels_ = np.asarray(state["labels"], dtype=np.int64)
        model._X = _load_array(path, "points").astype(np.float32)
        model._sums = _load_array(path, "sums").astype(np.float64)
        model._sizes = _load_array(path, "sizes").astype(np.int64)
        return model

    # -- internals --

    def _require_fitted(self):
        if self.labels_ is None:
            raise ClusteringError("the clusterer is not fitted: call fit(X) first")

    def _kmeans(self, members, k, depth):
        """faiss k-means labels of ``members`` into k groups (seeded per recursion depth)."""
        if k <= 1 or len(members) <= 1:
            return np.zeros(len(members), dtype=np.int64)
        return faiss_kmeans(self._X[members], k, self.seed + depth, self.niter, self.threads)[0]

    def _split(self, members, k, depth):
        """Groups of ``members`` (index arrays), each at most the cap."""
        cap = self.max_cluster_size
        assigned = self._kmeans(members, k, depth)
        groups = [members[assigned == c] for c in np.unique(assigned)]
        if k > 1 and len(groups) == 1:  # k-means could not split (e.g. identical points)
            return self._chunks(members)
        out = []
        for group in groups:
            if len(group) > cap:
                out.extend(self._split(group, math.ceil(len(group) / cap), depth + 1))
            else:
                out.append(group)
        return out

    def _chunks(self, members):
        """Equal chunks of at most the cap along the main direction: the fallback split."""
        X = self._X[members].astype(np.float64)
        centered = X - X.mean(0)
        direction = np.linalg.svd(centered, full_matrices=False)[2][0] if np.abs(centered).sum() else None
        order = np.argsort(centered @ direction, kind="stable") if direction is not None else np.arange(len(members))
        n_chunks = math.ceil(len(members) / self.max_cluster_size)
        return [members[part] for part in np.array_split(order, n_chunks)]

    def _split_cluster(self, label):
        """Split one over-cap cluster; its first part keeps ``label``, the others get new ids."""
        members = np.flatnonzero(self.labels_ == label)
        groups = self._split(members, max(2, math.ceil(len(members) / self.max_cluster_size)), depth=0)
        groups = [g for g in groups if len(g)]
        groups.sort(key=lambda g: int(g.min()))
        for k, group in enumerate(groups):
            new_label = label if k == 0 else len(self._sizes)
            self.labels_[group] = new_label
            total = self._X[group].sum(0).astype(np.float64)
            if k == 0:
                self._sums[label], self._sizes[label] = total, len(group)
            else:
                self._sums = np.concatenate([self._sums, total[None]])
                self._sizes = np.append(self._sizes, len(group))


# --- configuration and REKI's cluster representatives -------------------------------------------


def make_clusterer(config, kind="item"):
    """The clusterer the config asks for, capped for ``kind`` ("user" or "item").

    Keys: ``cluster_method`` (streakhc | kmeans), ``item_cluster_size`` and ``user_cluster_size``
    (REKI's caps; defaults in ``properties/overall.yaml``), and ``seed`` (0 when absent)."""
    if kind not in ("user", "item"):
        raise ClusteringError(f"kind must be 'user' or 'item', got {kind!r}")
    method = str(setting(config, "cluster_method")).lower()
    cap = int(setting(config, f"{kind}_cluster_size"))
    seed = config["seed"] if "seed" in config else None  # RecBole's setting; 0 for a dict without one
    seed = 0 if seed is None else int(seed)
    if method == "streakhc":
        return StreamingKernelTree(max_cluster_size=cap, seed=seed)
    if method == "kmeans":
        return KMeansClusterer(max_cluster_size=cap, seed=seed)
    raise ClusteringError(f"cluster_method={method!r} is unknown; choose one of {', '.join(METHODS)}")


def load_clusterer(path):
    """A clusterer saved by its ``save`` (e.g. a REKI-C store's ``item_clusterer`` folder), ready
    for ``insert``: new users or items join the existing clusters without a rebuild."""
    kinds = {cls.__name__: cls for cls in (StreamingKernelTree, KMeansClusterer)}
    name = _read_state(path).get("class")
    if name not in kinds:
        raise ClusteringError(f"{path}: saved clusterer class {name!r} is not one of {sorted(kinds)}")
    return kinds[name].load(path)


def top_d_items(histories, d=15):
    """REKI Eq. 1: the ``d`` items occurring most often in a user cluster's member histories.

    ``histories``: one list of item ids per member (their *training* interactions only, so that
    no test interaction reaches a prompt). Every occurrence counts. Ties are broken by first
    occurrence (members in the order given, each history in its order), so the result does not
    depend on hashing and a cluster prompt is stable from run to run."""
    if d < 1:
        raise ClusteringError(f"d must be at least 1, got {d}")
    counts, first_seen = {}, {}
    for history in histories:
        for item in history:
            if item not in counts:
                counts[item] = 0
                first_seen[item] = len(first_seen)
            counts[item] += 1
    ranked = sorted(counts, key=lambda item: (-counts[item], first_seen[item]))
    return ranked[:d]
