"""A durable, append-only cache of LLM answers (one JSON record per line).

Why append-only JSONL with an fsync per answer: generating knowledge for a dataset can mean
tens of thousands of paid calls over hours. Each answer is on disk before the next one is
counted as done, so a crash, Ctrl-C or ``kill -9`` loses no answer that was received, and a rerun
sends only the prompts still missing. A kill in the middle of a write can leave a truncated last
line; loading skips it with a warning and the next append starts on a fresh line.

Records are keyed by :func:`request_hash` of *what was asked* (backend, model, messages,
max_tokens, temperature), not by the user/item id, so the same prompt is never paid for twice,
even under another id or in another run. Record fields::

    {"hash", "key", "model", "prompt", "response", "usage", "created"}

plus, where known, ``finish_reason`` ("stop" or "length": the answer hit llm_max_tokens),
``served_model`` (the model the endpoint says answered), ``verdict`` (what the answer gate found
wrong with it, see answer_quality.py) and ``attempt`` (2 and up: asked again after a bad answer,
at ``temperature``). A hash may have several records; the last one written is its answer.

The API key and the endpoint URL are never written: neither is needed to reuse an answer.

Several processes may share one cache (runs of a grid on one ``knowledge_dir``). Each reads the
file once when it opens it, so before asking for a prompt a backend takes the prompt's claim
(:meth:`LLMCache.claim`: an exclusive lock on one of 256 files in ``claims/``, by hash) and
reads what others appended since (:meth:`LLMCache.refresh`): a prompt another process is asking
is waited for, then found, never paid twice. A claim ends with its process, so a killed run
blocks nobody.

In memory a cache holds each hash's place in the file (offset and length), not its record: a
record is read back when asked for. 100,000 answers with their prompts are hundreds of MB of
JSON; their places are a few MB.
"""

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from contextlib import ExitStack, contextmanager

CACHE_FILE = "llm_cache.jsonl"


def request_hash(backend, model, messages, max_tokens, temperature, **options):
    """sha256 of the canonical JSON of everything that determines an answer.

    ``max_tokens``/``temperature`` are normalised (``0`` and ``0.0`` must hash alike).
    ``options``: further generation settings (e.g. ``repetition_penalty``); one that is None is
    left out, so answers cached before an option existed keep their hash."""
    payload = {"backend": backend, "model": model, "messages": messages,
               "max_tokens": int(max_tokens), "temperature": float(temperature),
               **{name: value for name, value in options.items() if value is not None}}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class LLMCache:
    """Answers by request hash, loaded from and appended to ``<cache_dir>/llm_cache.jsonl``.

    Thread-safe: backends write from worker threads as answers arrive."""

    def __init__(self, cache_dir, filename=CACHE_FILE):
        os.makedirs(cache_dir, exist_ok=True)
        self.path = os.path.join(cache_dir, filename)
        self._lock = threading.Lock()
        self._places = {}  # hash -> (offset, length) of its last record in the file
        self._offset = 0  # bytes of the file read so far (whole lines)
        self._claims = os.path.join(cache_dir, "claims")
        self._load()

    def _load(self):
        """Read the file line by line (never whole: it may be larger than memory) into places."""
        if not os.path.exists(self.path):
            return
        offset, bad = 0, []
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                cut = not line.endswith(b"\n")  # a kill mid-write (only ever the last line read)
                body = line.rstrip(b"\n")
                if not body.strip():
                    continue
                record = self._parse(body)
                if record is None:
                    bad.append((number, cut))
                    continue
                self._places[record["hash"]] = (start, len(body))
        self._offset = offset
        for number, cut in bad:
            what = "truncated last line (an interrupted write)" if cut else "unreadable line"
            logging.getLogger().warning(f"LLM cache {self.path}: skipping {what} {number}; "
                                        f"its prompt will be generated again if needed")

    @staticmethod
    def _parse(line):
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str) \
                or not isinstance(record.get("response"), str):
            return None
        return record

    def _append(self, line):
        """Append ``line`` (fsynced) -> (the bytes written, the file offset where they ended)."""
        # One O_APPEND write per record: even two processes sharing the cache never interleave.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A kill mid-write (in any process) leaves a line without its newline: never glue onto it.
            size = os.fstat(fd).st_size
            data = (b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b"") + line
            written = os.write(fd, data)
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
            return data, os.lseek(fd, 0, os.SEEK_CUR)  # where this write ended, whatever others appended
        finally:
            os.close(fd)

    def refresh(self):
        """Read the records other processes appended since this cache last read the file."""
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            whole = data[:data.rfind(b"\n") + 1]  # a line still being written is read next time
            offset = self._offset
            self._offset += len(whole)
            for line in whole.split(b"\n"):
                start, offset = offset, offset + len(line) + 1
                record = self._parse(line) if line.strip() else None
                if record is not None:
                    self._places[record["hash"]] = (start, len(line))

    @contextmanager
    def claim(self, *hashes):
        """Hold the claims of ``hashes`` (other processes asking the same prompts wait) and read
        what was appended meanwhile; the caller then asks only what is still missing."""
        os.makedirs(self._claims, exist_ok=True)
        with ExitStack() as stack:
            for bucket in sorted({h[:2] for h in hashes}):  # one order everywhere: no deadlock
                handle = stack.enter_context(open(os.path.join(self._claims, f"{bucket}.lock"), "w"))
                fcntl.flock(handle, fcntl.LOCK_EX)
            self.refresh()
            yield

    def __len__(self):
        with self._lock:
            return len(self._places)

    def __contains__(self, hash_):
        with self._lock:
            return hash_ in self._places

    def get(self, hash_):
        """The cached answer text for ``hash_``, or None."""
        record = self.record(hash_)
        return None if record is None else record["response"]

    def record(self, hash_):
        """The whole cached record for ``hash_``, read from the file, or None."""
        with self._lock:
            place = self._places.get(hash_)
        if place is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(place[0])
            return self._parse(f.read(place[1]))

    def put(self, hash_, key, model, prompt, response, usage=None, **extra):
        """Store one answer durably (written and fsynced before returning). ``extra``: the
        optional record fields of the module docstring; None values are left out."""
        record = {"hash": hash_, "key": key, "model": model, "prompt": prompt, "response": response,
                  "usage": usage, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  **{name: value for name, value in extra.items() if value is not None}}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                data, end = self._append(line)
            except OSError as exc:  # a full disk above all: say which file, and that nothing cached is lost
                raise OSError(exc.errno, f"{exc.strerror}: could not write an answer to the LLM cache "
                                         f"{self.path} (the answers cached before it are kept; fix the "
                                         "cause, e.g. free disk space, and rerun: only the prompts still "
                                         "missing are sent)") from exc
            self._places[hash_] = (end - len(line), len(line) - 1)
            if self._offset == end - len(data):
                self._offset += len(data)  # nothing else was appended meanwhile
