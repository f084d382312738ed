"""The knowledge pipeline every technique shares: requests -> generation -> encoding -> store.

A technique supplies the requests (one per user/item/cluster/seed, each with a prompt and a
plain description) and the settings that identify them; this module generates the answers
through the configured backend (cached, resumable), encodes them, and writes the store.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict

from recbole_llmk.knowledge.encoder import TextEncoder
from recbole_llmk.knowledge.store import KnowledgeStore


def digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def store_settings(config, technique, split, prompt_digest):
    """What a store must match to be reused: anything that changes its vectors."""
    return {
        "technique": technique,
        "dataset": config["dataset"],
        "split": split,
        "encoder": config["text_encoder"],
        "encoder_pooling": config["encoder_pooling"] or "mean",
        "llm_backend": config["llm_backend"] or "none",
        "llm_model": config["llm_model"] if (config["llm_backend"] or "none") != "none" else None,
        "prompts": prompt_digest,
    }


def store_path(config, settings):
    if config["knowledge_store_path"]:
        return config["knowledge_store_path"]
    name = f"{settings['technique']}-{settings['llm_backend']}-{digest(settings)}"
    return os.path.join(config["knowledge_dir"] or "saved/knowledge", config["dataset"], name)


def cache_dir(config):
    return os.path.join(config["knowledge_dir"] or "saved/knowledge", "llm_cache")


def ensure_store(config, settings, make_requests):
    """Open the store for ``settings``, building it first when missing (or when asked to).

    ``make_requests()`` -> ``{kind: [Request]}``; keys of a kind's requests are ``kind:token``.
    """
    path = store_path(config, settings)
    logger = logging.getLogger()
    if KnowledgeStore.exists(path) and not config["knowledge_rebuild"]:
        store = KnowledgeStore.open(path)
        store.check(settings)
        logger.info(f"using knowledge store {path}")
        return store
    return build_store(config, settings, make_requests(), path)


def build_store(config, settings, requests, path):
    from recbole_llmk.knowledge.generation import make_backend

    logger = logging.getLogger()
    start = time.time()
    backend = make_backend(config, cache_dir(config))
    flat = [r for rs in requests.values() for r in rs]
    answers, report = backend.generate(flat)
    logger.info(report.summary())
    encoder = TextEncoder.from_config(config)
    entries = {}
    for kind, rs in requests.items():
        texts = [answers[r.key] for r in rs]
        tokens = [r.key.split(":", 1)[1] for r in rs]
        entries[kind] = (tokens, encoder.encode(texts, desc=f"encoding {kind} knowledge"), texts)
    meta = dict(settings, generation=asdict(report), llm_backend_model=backend.model_id,
                encoder_dim=encoder.dim, build_seconds=round(time.time() - start, 2),
                created=time.strftime("%Y-%m-%d %H:%M:%S"))
    store = KnowledgeStore.write(path, meta, entries)
    logger.info(f"knowledge store written to {path} ({', '.join(f'{k}: {len(v[0])}' for k, v in entries.items())})")
    return store
