"""faiss k-means with the StreaKHC clusterer's API and size cap: the fast alternative
(``cluster_method: kmeans``); also ReLand's clustering of behaviour vectors (:func:`faiss_kmeans`).
See :mod:`recbole_llmk.knowledge.clustering` for the shared API."""

import math

import numpy as np

from recbole_llmk.knowledge.cluster_state import (ClusteringError, _as_matrix, _check_ids, _clusters_of, _load_array, _read_state, _write_state)


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
