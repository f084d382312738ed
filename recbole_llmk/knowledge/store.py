"""Stage 5: the knowledge store, the hand-over point between offline knowledge and models.

A store is a folder: per entity kind (``user``, ``item``, or any other name a technique uses)
``<kind>.tokens.json`` (raw tokens), ``<kind>.rows.npy`` (int32, one per token: its row in the
next file), ``<kind>.vectors.npy`` (float32, or float16 when ``meta["vector_dtype"]`` says so:
half the disk and the pages read; each distinct vector once) and ``<kind>.texts.jsonl``
(each distinct text once with the tokens that have it, for people to read), plus ``meta.json``
(encoder, dim, generation backend/model, prompt-template hashes, dataset, split fingerprint,
costs). Collective knowledge gives a whole cluster one text; storing it once per cluster instead
of once per member makes such stores several times smaller (they travel to GPU machines).
Rows are aligned to RecBole's internal ids when loaded, through ``field2token_id``, so the
files' order never matters. Vectors are stored once and read, never recomputed, at training
and inference time; they are read memory-mapped, so loading a store copies only the rows a run's
ids need. Stores written before ``rows.npy`` existed (``<kind>.npy``, one row per
token) are still read.
"""

import hashlib
import json
import logging
import os

from typing import Optional

import numpy as np

from recbole_llmk.defaults import setting
from recbole_llmk.files import written_whole
from recbole_llmk.knowledge.controls import apply_control


class KnowledgeStoreError(ValueError):
    """A store that is missing, incomplete or built for other settings than the run's."""


class KnowledgeStore:
    META = "meta.json"

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.meta = meta

    @classmethod
    def write(cls, path: str, meta: dict, entries: dict, files: Optional[dict] = None) -> "KnowledgeStore":
        """``entries``: kind -> (tokens, vectors, texts); ``files``: extra things to keep with the
        store, ``{name: text}``, or ``{name: writer}`` where ``writer(path)`` saves a folder (e.g.
        a clusterer's ``save``). Written to a temp name, then renamed, so an interrupted build
        never leaves a store that looks complete. Vectors are kept as ``meta["vector_dtype"]``
        (default float32); a model always reads float32 (:meth:`aligned`)."""
        dtype = np.dtype(meta.get("vector_dtype", "float32"))
        with written_whole(path) as tmp:
            os.makedirs(tmp)
            for name, content in (files or {}).items():
                if callable(content):
                    content(os.path.join(tmp, name))
                    continue
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(content)
            for kind, (tokens, vectors, texts) in entries.items():
                if len(tokens) != len(vectors) or len(tokens) != len(texts):
                    raise ValueError(f"{kind}: {len(tokens)} tokens, {len(vectors)} vectors, {len(texts)} texts")
                _write_kind(tmp, kind, [str(t) for t in tokens], np.asarray(vectors), texts, dtype)
            meta = dict(meta, kinds=sorted(entries), dims={k: int(np.asarray(v[1]).shape[1]) for k, v in entries.items()})
            with open(os.path.join(tmp, cls.META), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
        return cls(path, meta)

    @classmethod
    def open(cls, path: str) -> "KnowledgeStore":
        meta_file = os.path.join(path or "", cls.META)
        if not path or not os.path.isfile(meta_file):
            raise KnowledgeStoreError(f"no knowledge store at '{path}' ({cls.META} missing). Build it with "
                                      "run_recbole_llmk.py --run=knowledge, or run the model to build it.")
        meta = _read(path, cls.META, _json)
        if not isinstance(meta, dict):
            raise _damaged(path, cls.META, "not a JSON object")
        return cls(path, meta)

    @staticmethod
    def exists(path):
        return bool(path) and os.path.isfile(os.path.join(path, KnowledgeStore.META))

    def check(self, expected):
        """Raise, naming the setting, when the store was built for something else."""
        for key, value in expected.items():
            if value is not None and self.meta.get(key) != value:
                raise KnowledgeStoreError(
                    f"knowledge store {self.path} was built with {key}={self.meta.get(key)!r}, but this run "
                    f"has {key}={value!r}. Point knowledge_store_path elsewhere, or delete the folder "
                    "(or set knowledge_rebuild=True) to rebuild it for this run."
                )

    def vectors(self, kind: str) -> "tuple[list[str], np.ndarray]":
        """``(tokens, [len(tokens), dim] float32)``, one row per token."""
        tokens, rows, distinct = self._rows(kind)
        return tokens, distinct[rows]

    def texts(self, kind: str) -> "dict[str, str]":
        """``{token: text}``."""
        records = _read(self.path, f"{kind}.texts.jsonl", _json_lines)
        return {token: r["text"] for r in records for token in r.get("tokens", [r.get("token")])}

    def _rows(self, kind):
        if kind not in self.meta.get("kinds", []):
            raise KnowledgeStoreError(f"knowledge store {self.path} has no '{kind}' knowledge "
                                      f"(it has {self.meta.get('kinds')})")
        tokens = _read(self.path, f"{kind}.tokens.json", _json)
        if not os.path.isfile(os.path.join(self.path, f"{kind}.rows.npy")):  # from before deduplication
            return tokens, np.arange(len(tokens)), _read(self.path, f"{kind}.npy", _mapped)
        rows = _read(self.path, f"{kind}.rows.npy", _array)
        distinct = _read(self.path, f"{kind}.vectors.npy", _mapped)
        dim = self.meta.get("dims", {}).get(kind)
        if distinct.ndim != 2 or (dim is not None and distinct.shape[1] != dim):
            raise _damaged(self.path, f"{kind}.vectors.npy", f"shape {distinct.shape}, {self.META} says {dim} dims")
        if len(rows) != len(tokens) or (len(rows) and (rows.max() >= len(distinct) or rows.min() < 0)):
            raise _damaged(self.path, f"{kind}.rows.npy", f"'{kind}' has {len(tokens)} tokens, {len(rows)} rows "
                                                          f"and {len(distinct)} vectors")
        return tokens, rows, distinct

    def aligned(self, kind: str, dataset, field: str, default: str = "mean") -> np.ndarray:
        """``[dataset.num(field), dim]`` float32 matrix indexed by RecBole's internal id.

        Ids without knowledge (cold users/items, never the padding id 0) get a default vector:
        the mean of the known vectors, or zeros. Their number is logged. The stored vectors are
        read memory-mapped, a chunk of rows at a time: the table is the one full copy made."""
        tokens, rows, distinct = self._rows(kind)
        token2id = dataset.field2token_id[field]
        ids = np.array([token2id.get(t, -1) for t in tokens], dtype=np.int64)
        known = ids >= 0
        ids, rows = ids[known], np.asarray(rows)[known]
        table = np.zeros((dataset.num(field), distinct.shape[1]), dtype=np.float32)
        if default == "mean" and len(ids):
            table[:] = mean_of_rows(distinct, rows)  # over ids, not distinct rows: a big cluster weighs more
        elif default not in ("mean", "zero"):
            raise ValueError(f"knowledge_default must be 'mean' or 'zero', got '{default}'")
        table[0] = 0.0
        for start in range(0, len(ids), CHUNK_ROWS):
            table[ids[start:start + CHUNK_ROWS]] = distinct[rows[start:start + CHUNK_ROWS]]
        covered = np.zeros(len(table), dtype=bool)
        covered[ids] = True
        cold = int((~covered[1:]).sum())
        logging.getLogger().info(
            f"{kind} knowledge from {self.path}: {len(ids)} of {len(table) - 1} {field} ids "
            f"covered, {cold} get the {default} default vector"
            + (f", {int((~known).sum())} stored tokens not in this dataset" if (~known).any() else ""))
        return table


CHUNK_ROWS = 65536  # rows of a memory-mapped store read at once


def mean_of_rows(distinct, rows):
    """``distinct[rows].mean(0)`` without making ``distinct[rows]``: numpy sums a float32 matrix
    down its rows in order, so carrying the running sum from chunk to chunk gives the same bits."""
    total = np.zeros(distinct.shape[1], dtype=np.float32)
    for start in range(0, len(rows), CHUNK_ROWS):
        total = np.add.reduce(np.concatenate([total[None], distinct[rows[start:start + CHUNK_ROWS]]]), axis=0)
    return total / np.float32(len(rows))


def stores_in(folder):
    """Every store under ``folder`` (a ``knowledge_dir``, or one dataset's folder in it), as rows a
    person can tell apart: folder, technique, backend and model, encoder, split, kinds, created, MB."""
    rows = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("llm_cache", "encodings"))
        if KnowledgeStore.META not in files:
            continue
        dirs[:] = []  # a store's subfolders (a clusterer's state) are not stores
        meta = KnowledgeStore.open(root).meta
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(root) for f in fs)
        model = meta.get("llm_model") or ""
        rows.append({"store": os.path.relpath(root, folder), "technique": meta.get("technique"),
                     "knowledge": f"{meta.get('llm_backend')}{' ' + os.path.basename(str(model)) if model else ''}",
                     "dataset": meta.get("dataset"), "encoder": os.path.basename(str(meta.get("encoder"))),
                     "split": str(meta.get("split"))[:8], "kinds": ",".join(meta.get("kinds", [])),
                     "created": meta.get("created"), "MB": round(size / 2 ** 20, 1)})
    return rows


def main(argv=None):
    """``python -m recbole_llmk.knowledge.store [knowledge_dir]``: list the stores there."""
    import argparse

    parser = argparse.ArgumentParser(description="List the knowledge stores under a folder.")
    parser.add_argument("folder", nargs="?", default=os.path.join("saved", "knowledge"))
    rows = stores_in(parser.parse_args(argv).folder)
    if not rows:
        print("no knowledge stores there")
        return rows
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return rows


def run_table(store, config, dataset, kind, side):
    """``store``'s ``kind`` vectors aligned to ``dataset`` for ``side`` (``user``/``item``), with the
    run's ``knowledge_default`` and ``knowledge_control``."""
    field = config["USER_ID_FIELD" if side == "user" else "ITEM_ID_FIELD"]
    table = store.aligned(kind, dataset, field, setting(config, "knowledge_default"))
    return apply_control(table, setting(config, "knowledge_control"), config["seed"], side)


def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _array(path):
    return np.load(path, allow_pickle=False)


def _mapped(path):
    """A stored array memory-mapped (read-only): a page is read when a row on it is."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _damaged(folder, name, why):
    return KnowledgeStoreError(
        f"knowledge store file {os.path.join(folder, name)} is damaged or unreadable ({why}). Rebuild the store: "
        f"rerun with --knowledge_rebuild=True (or delete the folder {folder}).")


def _read(folder, name, reader):
    """``reader(<folder>/<name>)``; a missing, truncated or corrupt file is a KnowledgeStoreError
    that names it and how to rebuild the store (not numpy's or json's own message alone)."""
    try:
        return reader(os.path.join(folder, name))
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise _damaged(folder, name, f"{type(exc).__name__}: {exc}") from exc


def _write_kind(folder, kind, tokens, vectors, texts, dtype=np.float32):
    """One kind's files: each distinct (vector, text) pair once, in order of first appearance,
    written ``CHUNK_ROWS`` rows at a time as ``dtype`` (no second copy of the vectors is made)."""
    row_of, rows = {}, []
    for vector, text in zip(vectors, texts):  # keyed by a digest of the vector: not a copy of it
        key = (hashlib.blake2b(vector.tobytes(), digest_size=16).digest(), text)
        rows.append(row_of.setdefault(key, len(row_of)))
    rows = np.asarray(rows, dtype=np.int32)
    first = np.unique(rows, return_index=True)[1]  # the first token of each row, row order
    with open(os.path.join(folder, f"{kind}.vectors.npy"), "wb") as f:  # a .npy file, written a chunk at a time
        shape = (len(first), vectors.shape[1] if vectors.ndim == 2 else 0)
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": shape})
        for start in range(0, len(first), CHUNK_ROWS):
            f.write(np.ascontiguousarray(vectors[first[start:start + CHUNK_ROWS]], dtype=dtype).tobytes())
    np.save(os.path.join(folder, f"{kind}.rows.npy"), rows)
    with open(os.path.join(folder, f"{kind}.tokens.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f)
    members = [[] for _ in first]
    for token, row in zip(tokens, rows):
        members[row].append(token)
    with open(os.path.join(folder, f"{kind}.texts.jsonl"), "w", encoding="utf-8") as f:
        for i, row_tokens in zip(first, members):
            f.write(json.dumps({"tokens": row_tokens, "text": texts[i]}, ensure_ascii=False) + "\n")


def pca_reduce(tables, dim):
    """Project aligned knowledge tables onto their top ``dim`` principal components.

    One projection is fitted on the rows of all tables together (user and item knowledge share
    HEIN's experts, so they must share a space); row 0, the padding id, stays zero. REKI deploys
    reduced vectors because the adaptor's first layer dominates training cost."""
    stacked = np.concatenate([t[1:] for t in tables])
    if dim >= stacked.shape[1]:
        return tables
    mean = stacked.mean(0)
    _, _, components = np.linalg.svd(stacked - mean, full_matrices=False)
    projection = components[:dim].T.astype(np.float32)
    reduced = []
    for table in tables:
        out = (table - mean) @ projection
        out[0] = 0.0
        reduced.append(out.astype(np.float32))
    logging.getLogger().info(f"knowledge vectors reduced by PCA from {stacked.shape[1]} to {dim} dimensions")
    return reduced


if __name__ == "__main__":
    main()
