"""Texts encoded once, for every store: a vector cache keyed by encoder setting and text.

Encoding is most of a knowledge build, and the techniques encode the same texts again (REKI's
item descriptions, LEARN's item texts, ReLand's "+f_item" and each REKI mode read one dataset's
descriptions). ``encoding_cache: True`` keeps every vector in one SQLite file per encoder setting
(``<knowledge_dir>/encodings/<encoder>-<digest>.sqlite``; the digest covers the encoder, its
pooling, max length, truncation, dtype and device type, everything that changes a vector), so a
text is encoded once per setting, whichever store asks. Vectors are written every few batches: a
killed build keeps what it encoded. SQLite serialises writers, so processes may share the file.

A text's vector can differ from a fresh encoding of it in the last float digits (it was encoded
in another batch, padded to another length); the store records how many vectors it reused.
"""

import hashlib
import json
import os
import re
import sqlite3
from contextlib import contextmanager

import numpy as np

SAVE_EVERY = 1024  # texts encoded between writes: what a kill can lose


class EncodingCache:
    def __init__(self, folder, encoder):
        identity = {"encoder": encoder.name, "pooling": encoder.pooling, "max_length": encoder.max_length,
                    "truncation": encoder.truncation, "dtype": str(encoder.model.dtype),
                    "device": encoder.device.type}
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(encoder.name)))[:60]
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{name}-{digest}.sqlite")
        self.encoder, self.dim = encoder, encoder.dim
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS vectors (text_sha BLOB PRIMARY KEY, vector BLOB NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS identity (json TEXT)")
            if db.execute("SELECT COUNT(*) FROM identity").fetchone()[0] == 0:
                db.execute("INSERT INTO identity VALUES (?)", (json.dumps(identity, sort_keys=True),))

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=120)
        try:
            with db:  # one transaction: committed whole, or rolled back
                yield db
        finally:
            db.close()

    def encode(self, texts, desc="encoding"):
        """``[len(texts), dim]`` float32, as ``encoder.encode`` gives, reading what is cached and
        encoding the rest; -> (vectors, number of texts read from the cache)."""
        keys = [hashlib.sha256(t.encode("utf-8")).digest()[:16] for t in texts]
        found = self._lookup(set(keys))
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        missing = [i for i, key in enumerate(keys) if key not in found]
        for i, key in enumerate(keys):
            if key in found:
                vectors[i] = found[key]
        pending = []

        def save(indices, encoded):
            pending.extend(zip(indices, encoded))
            if len(pending) >= SAVE_EVERY:
                self._save([(keys[missing[j]], v) for j, v in pending])
                pending.clear()

        if missing:
            vectors[missing] = self.encoder.encode([texts[i] for i in missing], desc=desc, on_batch=save)
            self._save([(keys[missing[j]], v) for j, v in pending])
        return vectors, len(texts) - len(missing)

    def _lookup(self, keys):
        found, keys = {}, list(keys)
        with self._connect() as db:
            for start in range(0, len(keys), 500):  # SQLite caps the parameters of one statement
                chunk = keys[start:start + 500]
                rows = db.execute(f"SELECT text_sha, vector FROM vectors WHERE text_sha IN ({','.join('?' * len(chunk))})",
                                  chunk)
                found.update((key, np.frombuffer(blob, dtype=np.float32)) for key, blob in rows)
        return {key: v for key, v in found.items() if len(v) == self.dim}

    def _save(self, items):
        if items:
            with self._connect() as db:
                db.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)",
                               [(key, np.asarray(v, dtype=np.float32).tobytes()) for key, v in items])
