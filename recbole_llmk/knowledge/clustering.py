"""Clusters of users and items for REKI's collective knowledge.

REKI (Xi et al.) does not prompt the LLM once per user and per item: it groups items (and users)
into clusters and asks once per cluster, so the number of calls is the number of clusters
(377 for ML-1M instead of ~10k). The authors build the clusters with StreaKHC (Han et al.,
"Streaming Hierarchical Clustering Based on Point-Set Kernel", KDD 2022) and cut the cluster tree so
that no cluster holds more than 80 items or 100 users. A user cluster is then described to the
LLM by the d items its members interacted with most (Eq. 1, REKI's technique:
:func:`recbole_llmk.techniques.reki.top_d_items`).

Two clusterers with one API (``fit`` / ``labels_`` / ``clusters`` / ``insert`` / ``save`` /
``load``):

* :class:`~recbole_llmk.knowledge.streakhc.StreamingKernelTree`: a StreaKHC-style tree, built one point at a time, so that new
  users and items can join the existing clusters without re-clustering (and without asking the
  LLM again about clusters they did not join).
* :class:`~recbole_llmk.knowledge.kmeans.KMeansClusterer`: faiss k-means, the fast alternative, with the same size cap.

Both are deterministic for a given ``seed``. :func:`make_clusterer` picks one from the config
(``cluster_method``, ``item_cluster_size``, ``user_cluster_size``, ``seed``).
"""

from recbole_llmk.defaults import setting
from recbole_llmk.knowledge.cluster_state import ClusteringError, _read_state
from recbole_llmk.knowledge.kmeans import KMeansClusterer
from recbole_llmk.knowledge.streakhc import StreamingKernelTree

METHODS = ("streakhc", "kmeans")
__all__ = ["ClusteringError", "KMeansClusterer", "METHODS", "StreamingKernelTree", "load_clusterer", "make_clusterer"]


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
