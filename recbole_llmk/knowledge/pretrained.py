"""ID vectors from a RecBole model trained on the run's own training split.

ReLand's behaviour encoder (user vectors for seed sampling and retrieval) and REKI-C's clustering
(item embeddings and user representations) both need a light collaborative model trained on
exactly the interactions knowledge may see. ``pretrained_vectors`` trains one with RecBole's own
Config, dataset, split and trainer, checks by split fingerprint that it saw the run's training
split and nothing else (its own split of the data may hold a few pairs more: they are dropped from
its training rows), and caches its user and item vectors under ``knowledge_dir``.
"""

import inspect
import logging
import os

import numpy as np

from recbole_llmk.defaults import setting
from recbole_llmk.files import written_whole
from recbole_llmk.knowledge.history import (LeakageError, pairs_outside, split_fingerprint, training_dataset,
                                          training_interactions)


def derived_config(config, model, overrides=None):
    """Config of ``model`` on the run's dataset and split: the run's dataset arguments and
    ``eval_args`` split/order/group_by, the model's own defaults, ``overrides`` on top. The
    command line is not read again: the run's ``--key=value`` options are meant for the run's model."""
    from recbole.utils.argument_list import dataset_arguments

    from recbole_llmk.config import LLMKConfig

    class DerivedConfig(LLMKConfig):
        def _load_cmd_line(self):
            return {}

    carried = [*dataset_arguments, "seed", "reproducibility", "use_gpu", "gpu_id", "state", "show_progress",
               "checkpoint_dir"]
    values = {k: config[k] for k in carried if config[k] is not None}
    values["data_path"] = config["data_path"]  # the dataset's own folder: LLMKConfig accepts it as it is
    split = {k: config["eval_args"][k] for k in ("split", "order", "group_by") if k in config["eval_args"]}
    values.update(eval_args=dict(split, mode="full"), **(overrides or {}))
    return DerivedConfig(model, config["dataset"], config_dict=values)


def id_vectors(model):
    """``(users [n_users, d], items [n_items, d])`` of a trained general RecBole model, by internal id:
    graph models' propagated embeddings (``forward()``), else their user/item embedding tables."""
    import torch

    model.eval()
    with torch.no_grad():
        if not inspect.signature(model.forward).parameters:  # LightGCN, NGCF, ...: forward() -> (users, items)
            out = model.forward()
            if isinstance(out, (tuple, list)) and len(out) == 2 and out[0].shape[0] == model.n_users:
                return out[0].float().cpu().numpy(), out[1].float().cpu().numpy()
        tables = {}
        for side, n in (("user", model.n_users), ("item", model.n_items)):
            found = [m.weight for name, m in model.named_children()
                     if isinstance(m, torch.nn.Embedding) and side in name and m.num_embeddings == n]
            if found:
                tables[side] = torch.cat(found, dim=1).float().cpu().numpy()
        if len(tables) == 2:
            return tables["user"], tables["item"]
    raise ValueError(f"{type(model).__name__} exposes no user and item vectors: use LightGCN, NGCF, BPR, NeuMF "
                     "or another general model with user and item embedding tables")


def train_on_split(config, frame, model, overrides=None):
    """``(config, dataset, train_data, net)``: ``model`` trained by RecBole's trainer (no
    validation) on the run's split, whose training interactions are ``frame``. A model that
    builds knowledge first (``prepare_knowledge``, e.g. LEARN's content store) builds it here."""
    from recbole.utils import init_seed

    from recbole_llmk.utils import create_dataset, data_preparation, get_trainer

    m_config = derived_config(config, model, overrides)
    init_seed(m_config["seed"], m_config["reproducibility"])
    dataset = create_dataset(m_config)
    train_data, _, _ = data_preparation(m_config, dataset)
    # Exact, not over-strict: the model may train on fewer pairs than the run, never on a pair the
    # run's training split lacks, which the run may evaluate on. RecBole's sequential and general
    # leave-one-out splits differ for users with 1-3 interactions and for timestamp ties: such
    # pairs are dropped from the model's training rows.
    outside = pairs_outside(training_interactions(training_dataset(train_data)), frame)
    if outside:
        train_data = restricted_to(train_data, frame, m_config)
        logging.getLogger().info(
            f"{m_config['model']}'s split of the data ({m_config['MODEL_TYPE'].name.lower()}) trains on {len(outside)} "
            f"(user, item) pairs the run's training split lacks (e.g. user {outside[0][0]} with item "
            f"{outside[0][1]}); they are dropped from its training rows, so it sees none of them")
        outside = pairs_outside(training_interactions(training_dataset(train_data)), frame)
    if outside:  # a defence: restricted_to leaves none
        user, item = outside[0]
        raise LeakageError(
            f"{m_config['model']} would train on another split than the run: {len(outside)} of its training "
            f"(user, item) pairs are not in the run's training split, e.g. user {user} with item {item}, which the "
            f"run may evaluate on (eval_args {m_config['eval_args']}, a {m_config['MODEL_TYPE'].name.lower()} "
            f"model). Give the run an eval_args split that {m_config['model']} reproduces (e.g. order TO, "
            f"an LS split), or set it explicitly in your yaml")
    prepare_knowledge = getattr(m_config.model_class, "prepare_knowledge", None)
    if prepare_knowledge:  # e.g. LEARN's content store (the model class says; quick_start is not imported)
        prepare_knowledge(m_config, train_data)
    init_seed(m_config["seed"], m_config["reproducibility"])
    net = m_config.model_class(m_config, train_data._dataset).to(m_config["device"])
    logging.getLogger().info(
        f"training {m_config['model']} for {m_config['epochs']} epochs on the training split (no validation), "
        f"for the knowledge; its epochs are the technique's own setting (reki_cluster_model_epochs, "
        f"reland_behaviour_epochs, learn_features_epochs), not --epochs={config['epochs']}")
    get_trainer(m_config)(m_config, net).fit(train_data, None, saved=False, show_progress=m_config["show_progress"])
    net.eval()
    return m_config, dataset, train_data, net


def restricted_to(train_data, frame, config):
    """``train_data`` without its rows that hold a (user, item) pair the run's training split
    (``frame``) lacks: as target, or for a sequential model anywhere in the row's history."""
    dataset = train_data._dataset
    allowed = set(zip(frame["user"].astype(str), frame["item"].astype(str)))
    inter = dataset.inter_feat
    users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy()).astype(str)
    items = dataset.id2token(dataset.iid_field, inter[dataset.iid_field].numpy()).astype(str)
    keep = np.array([pair in allowed for pair in zip(users, items)], dtype=bool)
    history_field = dataset.iid_field + config["LIST_SUFFIX"]
    if history_field in inter:  # a sequential model's rows carry their history
        histories = inter[history_field].numpy()
        lengths = inter[config["ITEM_LIST_LENGTH_FIELD"]].numpy()
        for row in np.flatnonzero(keep):
            history = dataset.id2token(dataset.iid_field, histories[row, :lengths[row]]).astype(str)
            keep[row] = all((users[row], item) in allowed for item in history)
    return type(train_data)(config, dataset.copy(inter[np.flatnonzero(keep)]), train_data._sampler,
                            shuffle=config["shuffle"])


def pretrained_vectors(config, frame, model, epochs, overrides=None):
    """``{"user": (tokens, vectors), "item": (tokens, vectors)}`` of ``model`` trained for
    ``epochs`` on the split whose training interactions are ``frame``; built once, then cached."""
    from recbole_llmk.knowledge.pipeline import digest, store_lock

    overrides = dict(overrides or {}, epochs=epochs)
    key = digest([split_fingerprint(frame), model, overrides, config["seed"]])
    path = os.path.join(setting(config, "knowledge_dir"), config["dataset"], f"pretrained-{model}-{key}.npz")
    with store_lock(path):  # parallel runs on one split train the model once
        if os.path.isfile(path):
            saved = np.load(path, allow_pickle=False)
            logging.getLogger().info(f"pretrained {model} vectors from {path}")
            return {side: (list(saved[f"{side}_tokens"]), saved[f"{side}_vectors"]) for side in ("user", "item")}
        _, dataset, _, net = train_on_split(config, frame, model, overrides)
        users, items = id_vectors(net)
        result = {"user": ([str(t) for t in dataset.field2id_token[dataset.uid_field][1:]], users[1:]),
                  "item": ([str(t) for t in dataset.field2id_token[dataset.iid_field][1:]], items[1:])}
        with written_whole(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no ".npz"
            np.savez(f, **{f"{side}_{part}": np.asarray(value) for side, (tokens, vectors) in result.items()
                           for part, value in (("tokens", tokens), ("vectors", vectors))})
        return result
