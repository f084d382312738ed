"""A StreaKHC-style clusterer (Han et al., "Streaming Hierarchical Clustering Based on Point-Set
Kernel", KDD 2022), the one the REKI authors build their clusters with: a tree built one point at a
time, so that new users and items can join the existing clusters without re-clustering (and
without asking the LLM again about clusters they did not join), cut so that no cluster holds more
than a cap of points. See :mod:`recbole_llmk.knowledge.clustering` for the shared API."""


import numpy as np

from recbole_llmk.knowledge.cluster_state import (ClusteringError, _as_matrix, _check_ids, _clusters_of, _load_array, _read_state, _write_state)


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
