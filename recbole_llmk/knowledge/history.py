"""Training interactions: the only behaviour knowledge may ever see.

Every technique reads user behaviour through ``training_interactions``, which accepts RecBole's
*training* dataloader and refuses evaluation loaders, so a valid/test interaction cannot reach a
prompt, a cluster or a seed-user sample by construction. The split fingerprint ties stored
knowledge to the exact training split it was built from.
"""

import hashlib

import numpy as np
import pandas as pd
from recbole.data.dataloader import AbstractDataLoader
from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader


class LeakageError(ValueError):
    """Raised when evaluation data is offered where only training data may go."""


def training_dataset(train_data):
    """The dataset behind a *training* dataloader; evaluation loaders are refused."""
    if isinstance(train_data, (FullSortEvalDataLoader, NegSampleEvalDataLoader)):
        raise LeakageError(
            f"{type(train_data).__name__} is an evaluation dataloader: knowledge is built from the "
            "training split only. Pass train_data from data_preparation."
        )
    if isinstance(train_data, AbstractDataLoader):
        return train_data._dataset
    raise TypeError(f"expected RecBole's training dataloader, got {type(train_data).__name__}")


def training_interactions(dataset):
    """Raw-token frame (user, item[, rating][, timestamp]) of a training split's interactions.

    For sequential datasets each row holds a target and its history; as in RecBole's own
    ``SequentialDataset.inter_matrix``, the interactions are every row's target plus the first
    history item of rows whose history has length 1.
    """
    inter = dataset.inter_feat
    columns = {"user": dataset.uid_field, "item": dataset.iid_field,
               "rating": dataset.config["RATING_FIELD"], "timestamp": dataset.config["TIME_FIELD"]}
    columns = {k: v for k, v in columns.items() if v and v in inter}
    data = {k: inter[v].cpu().numpy() for k, v in columns.items()}
    length_field = dataset.config["ITEM_LIST_LENGTH_FIELD"]
    suffix = dataset.config["LIST_SUFFIX"]
    if length_field in inter and columns["item"] + suffix in inter:
        first = inter[length_field].cpu().numpy() == 1
        for k, v in columns.items():
            extra = inter[v].cpu().numpy()[first] if k == "user" else inter[v + suffix][:, 0].cpu().numpy()[first]
            data[k] = np.concatenate([data[k], extra])
    frame = pd.DataFrame(data)
    frame["user"] = dataset.id2token(dataset.uid_field, frame["user"].to_numpy())
    frame["item"] = dataset.id2token(dataset.iid_field, frame["item"].to_numpy())
    return frame


def split_fingerprint(frame):
    """A hash of the (user, item) pairs of a training split, independent of row order."""
    pairs = np.sort((frame["user"].astype(str) + "\x1f" + frame["item"].astype(str)).to_numpy())
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:16]


def pairs_outside(frame, allowed):
    """The (user, item) pairs of ``frame`` that ``allowed`` does not have, sorted."""
    def pairs(f):
        return set(zip(f["user"].astype(str), f["item"].astype(str)))

    return sorted(pairs(frame) - pairs(allowed))


def recent_histories(frame, length):
    """``{user token: frame of that user's last ``length`` training interactions, oldest first}``."""
    if "timestamp" in frame:
        frame = frame.sort_values(["user", "timestamp"], kind="stable")
    return {user: rows.tail(length) for user, rows in frame.groupby("user", sort=False)}
