"""What both clusterers share: their error, id checks, and saving their state as JSON and .npy
(no pickle), so a saved clusterer loads without trusting code."""

import json
import os

import numpy as np


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
