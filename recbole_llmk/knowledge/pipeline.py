"""The knowledge pipeline every technique shares: requests -> generation -> encoding -> store.

A technique supplies the requests (one per user/item/cluster/seed, each with a prompt and a
plain description) and the settings that identify them; this module generates the answers
through the configured backend (cached, resumable), encodes them, and writes the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from recbole_llmk.defaults import setting
from recbole_llmk.knowledge.encoder import TextEncoder
from recbole_llmk.knowledge.generation import Request, make_backend
from recbole_llmk.knowledge.store import KnowledgeStore


def digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def store_settings(config, technique, split, prompt_digest):
    """What a store must match to be reused: anything that changes its vectors."""
    settings = {
        "technique": technique,
        "dataset": config["dataset"],
        "split": split,
        "encoder": config["text_encoder"],
        "encoder_pooling": setting(config, "encoder_pooling"),
        "llm_backend": setting(config, "llm_backend"),
        "llm_model": config["llm_model"] if (setting(config, "llm_backend")) != "none" else None,
        "prompts": prompt_digest,
    }
    # Text from files outside the dataset: another file is another store (set only then, so the
    # stores of runs without one keep their names).
    text_files = {kind: text_file_identity(config[f"{kind}_text_file"]) for kind in ("user", "item")
                  if config[f"{kind}_text_file"]}
    if text_files:
        settings["text_files"] = text_files
    if (setting(config, "encoder_truncation")) != "head":  # likewise: only when not the default
        settings["encoder_truncation"] = config["encoder_truncation"]
    if setting(config, "knowledge_vector_dtype") != "float32":  # likewise
        settings["vector_dtype"] = config["knowledge_vector_dtype"]
    return settings


def text_file_identity(path):
    """A text file by name and content, so an edited file builds a new store."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist (user_text_file / item_text_file: a CSV or TSV file: "
                                f"id column, then text)")
    with open(path, "rb") as f:
        return f"{os.path.basename(path)}@{hashlib.sha256(f.read()).hexdigest()[:12]}"


def store_path(config, settings):
    if config["knowledge_store_path"]:
        return config["knowledge_store_path"]
    name = f"{settings['technique']}-{settings['llm_backend']}-{digest(settings)}"
    return os.path.join(setting(config, "knowledge_dir"), config["dataset"], name)


def cache_dir(config):
    """Where LLM answers are cached: ``llm_cache_dir``, or ``<knowledge_dir>/llm_cache``."""
    return config["llm_cache_dir"] or os.path.join(setting(config, "knowledge_dir"), "llm_cache")


@dataclass
class KnowledgePlan:
    """What a technique asks of the pipeline.

    ``requests``: prompts to generate through the configured backend; ``texts``: knowledge that
    needs no generation (e.g. plain descriptions), by key; ``layout``: for each store kind, which
    key's text each user/item gets (``{kind: {token: key}}``). Many tokens may share one key (a
    cluster's knowledge); each distinct text is encoded once. ``sides``: which kinds feed the
    model's user and item sides (default: ``user`` and ``item``). ``backend``: generation settings
    that replace the run's ``llm_*`` keys (e.g. replaying released answers). ``postprocess``:
    ``f(answers) -> (answers, files)`` applied to the generated answers before encoding (e.g.
    keeping the part of a reasoning answer that is the knowledge); ``files`` (``{name: text}``)
    are written into the store folder for people to read. ``vectors``: ``{kind: (tokens, vectors)}``
    computed elsewhere (e.g. LEARN's towers), stored as they are, with no text."""

    requests: list[Request]
    layout: dict[str, dict[str, str]]
    texts: dict[str, str] = field(default_factory=dict)
    sides: Optional[dict[str, list[str]]] = None
    backend: Optional[dict] = None
    postprocess: Optional[Callable[[dict[str, str]], tuple[dict[str, str], dict]]] = None
    vectors: Optional[dict[str, tuple[list[str], np.ndarray]]] = None

    @classmethod
    def individual(cls, requests):
        """One request per user/item: ``{kind: [Request keyed kind:token]}``."""
        layout = {kind: {r.key.split(":", 1)[1]: r.key for r in rs} for kind, rs in requests.items()}
        return cls([r for rs in requests.values() for r in rs], layout)


def ensure_store(config, settings: dict, make_plan: Callable[[], KnowledgePlan]) -> Optional[KnowledgeStore]:
    """Open the store for ``settings``, building it first when missing (or when asked to).

    ``make_plan()`` -> a :class:`KnowledgePlan`; it is only called when the store is built.
    With ``encoding_shard`` it only encodes its part of the texts (:func:`encode_shard`): None."""
    if setting(config, "encoding_shard"):
        return encode_shard(config, make_plan(), setting(config, "encoding_shard"))
    path = store_path(config, settings)
    # Runs in parallel (benchmark cells, a grid search) may want the same store: one builds it
    # while the others wait, then they open it.
    with store_lock(path):
        if KnowledgeStore.exists(path) and not config["knowledge_rebuild"]:
            store = KnowledgeStore.open(path)
            store.check(settings)
            logging.getLogger().info(f"using knowledge store {path}")
            return store
        return build_store(config, settings, make_plan(), path)


def store_lock(path):
    """An exclusive lock on ``.locks/<name>.lock`` beside ``path`` for as long as the block runs:
    one build per store. (Lock files stay: removing one another process may be waiting on would
    let two builds run. They are empty and kept out of sight of the store listing.)"""
    folder, name = os.path.split(path.rstrip("/"))
    return file_lock(os.path.join(folder, ".locks", name + ".lock"))


@contextmanager
def file_lock(path, wait=True):
    """An exclusive lock on the file ``path`` for as long as the block runs; yields whether this
    process holds it (always, when ``wait``; without, False if another process does). The lock
    ends with its process, so a killed holder never blocks the next one."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def encode_texts(config, encoder, texts):
    """``(vectors, how many came from the encoding cache)``; see :mod:`.encoding_cache`."""
    if not setting(config, "encoding_cache"):
        return encoder.encode(texts, desc="encoding knowledge"), 0
    from recbole_llmk.knowledge.encoding_cache import EncodingCache

    cache = EncodingCache(os.path.join(setting(config, "knowledge_dir"), "encodings"), encoder)
    vectors, reused = cache.encode(texts, desc="encoding knowledge")
    logging.getLogger().info(f"{reused} of {len(texts)} knowledge texts were encoded before ({cache.path})")
    return vectors, reused


def planned_texts(config, plan: KnowledgePlan):
    """Generate the plan's answers (cached, resumable) and gather the texts its store holds:
    -> ``(texts by key, the keys the layout uses, backend, generation report, files)``."""
    backend = make_backend(plan.backend or config, cache_dir(config))
    answers, report = backend.generate(plan.requests)
    logging.getLogger().info(report.summary())
    files = {}
    if plan.postprocess:
        answers, files = plan.postprocess(answers)
    texts = {**plan.texts, **answers}
    missing = {key for rows in plan.layout.values() for key in rows.values()} - set(texts)
    if missing:
        raise KeyError(f"knowledge plan refers to {len(missing)} keys with no text, e.g. {sorted(missing)[:3]}")
    keys = sorted({key for rows in plan.layout.values() for key in rows.values()})
    return texts, keys, backend, report, files


def encode_shard(config, plan: KnowledgePlan, shard) -> None:
    """``encoding_shard: [i, N]`` (with ``--run=knowledge``): encode the i-th of N equal parts of the
    store's texts into the encoding cache, and write no store. N processes (or machines sharing
    ``knowledge_dir``) encode a store's texts in parallel; the next ordinary run finds every vector
    cached and writes the store at once."""
    try:
        index, count = (int(part) for part in shard)
        assert 0 <= index < count
    except (TypeError, ValueError, AssertionError):
        raise ValueError(f"encoding_shard must be [i, N] with 0 <= i < N (e.g. --encoding_shard=\"[0,4]\"), "
                         f"got {shard!r}") from None
    if not setting(config, "encoding_cache"):
        raise ValueError("encoding_shard writes into the encoding cache: set encoding_cache=True")
    texts, keys, *_ = planned_texts(config, plan)
    part = keys[index * len(keys) // count:(index + 1) * len(keys) // count]
    if part:
        encode_texts(config, TextEncoder.from_config(config), [texts[k] for k in part])
    logging.getLogger().info(f"encoding shard {index} of {count}: {len(part)} of {len(keys)} texts encoded or found "
                             f"in the encoding cache; no store written (run again without encoding_shard)")
    return None


def build_store(config, settings: dict, plan: KnowledgePlan, path: str) -> KnowledgeStore:
    logger = logging.getLogger()
    start = time.time()
    texts, keys, backend, report, files = planned_texts(config, plan)
    vectors, encoder_dim = {}, None
    if keys:
        encoder = TextEncoder.from_config(config)
        encoded, reused = encode_texts(config, encoder, [texts[k] for k in keys])
        vectors = dict(zip(keys, encoded))
        encoder_dim = encoder.dim
    entries = {kind: (tokens, rows, [""] * len(tokens)) for kind, (tokens, rows) in (plan.vectors or {}).items()}
    for kind, rows in plan.layout.items():
        tokens = list(rows)
        if tokens:
            kind_vectors = np.stack([vectors[rows[t]] for t in tokens])
        else:  # e.g. no user's training likes match a released cluster: all get the default vector
            logging.getLogger().warning(f"knowledge kind '{kind}': no user or item has any; all get the default vector")
            kind_vectors = np.zeros((0, encoder_dim or 0), np.float32)
        entries[kind] = (tokens, kind_vectors, [texts[rows[t]] for t in tokens])
    meta = dict(settings, generation=asdict(report), llm_backend_model=backend.model_id,
                encoder_dim=encoder_dim, encodings_reused=reused if keys else 0, build_seconds=round(time.time() - start, 2),
                created=time.strftime("%Y-%m-%d %H:%M:%S"), distinct_texts=len(keys))
    if plan.sides:
        meta["knowledge_kinds"] = plan.sides
    store = KnowledgeStore.write(path, meta, entries, files)
    logger.info(f"knowledge store written to {path} ({', '.join(f'{k}: {len(v[0])}' for k, v in entries.items())})")
    return store
