"""Generation backends: turn knowledge requests (one prompt per user/item/...) into answer texts.

Every backend answers ``backend.generate(requests) -> (answers, report)`` where ``answers`` maps
each ``Request.key`` to a string and ``report`` is a :class:`GenerationReport`. The LLM backends
(``openai``, ``hf``) write each answer to a durable cache (:mod:`llm_cache`) the moment it
arrives, so an interrupted run resumes by sending only the prompts still missing, and an identical
prompt is never sent twice.

Backends (``llm_backend``):
  none     no LLM: each request's plain description is its knowledge text (the default, so that
           everything runs offline; the log says so).
  openai   any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, ...).
  hf       a local transformers causal LM, batched, on ``config["device"]``.
  replay   answers recorded earlier (a JSONL file); a prompt without a recording is an error.

For large jobs, :func:`export_batch` writes the missing prompts as an OpenAI Batch API /
``vllm run-batch`` input file and :func:`import_batch` loads its results into the cache; the next
``generate`` then sends nothing.

Config keys (all optional; a missing key or ``None`` means the default):
  llm_backend        none | openai | hf | replay                           (default none)
  llm_model          openai: the model name, e.g. gpt-3.5-turbo (required);
                     hf: a local transformers model folder (required); replay: only a label
  llm_base_url       openai: endpoint, e.g. http://localhost:8000/v1 (default: OpenAI's own)
  llm_api_key_env    environment variable holding the API key           (default OPENAI_API_KEY)
                     The key is read from it, never logged or stored. When it is unset and the
                     endpoint is local (localhost / 127.x), the key "EMPTY" is used.
  llm_concurrency    openai: parallel requests                            (default 8)
  llm_timeout        openai: seconds per request                          (default 60)
  llm_max_retries    openai: retries per prompt on 429, 5xx, timeouts, connection errors and
                     malformed or empty answers; then the prompt fails     (default 5)
  llm_backoff        openai: base seconds of the exponential backoff (with jitter, capped at
                     60 s; a server's Retry-After is honoured)             (default 1.0)
  llm_max_tokens     answer length limit                                  (default 512)
  llm_temperature    0 means greedy / deterministic                       (default 0.0)
  llm_system_prompt  optional system message sent before every prompt     (default none)
  llm_batch_size     hf: prompts per generate() batch                     (default 8)
  llm_replay_file    replay: the recorded JSONL file (required for replay)
  device             hf: a torch device or its name                        (default cpu)

The model, the messages (system prompt included), max_tokens and temperature identify a cached
answer; changing any of them asks again. The endpoint and the key do not.
"""

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from recbole_llmk.knowledge.llm_cache import LLMCache, request_hash

BACKENDS = ("none", "openai", "hf", "replay")
MAX_BACKOFF = 60.0
BATCH_URL = "/v1/chat/completions"
# HTTP statuses that are the configuration's fault, not one prompt's: stop before paying for more.
ABORT_STATUSES = {401: "authentication failed", 403: "permission denied", 404: "endpoint or model not found"}


class GenerationError(RuntimeError):
    """Generation could not produce every answer; the message says why and what to do.

    ``report`` (when set) is the :class:`GenerationReport` of the run that failed."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Request:
    key: str  # stable id, e.g. "user:196" or "item:242"
    prompt: str  # sent to the LLM as the single user message
    description: str  # the plain description ('none' backend's answer)


@dataclass
class GenerationReport:
    """What a generate() call cost. ``cached``: requests answered without a call (cache or
    recording); ``called``: calls actually sent, retries included; ``failed``: requests left
    without an answer."""

    requested: int = 0
    cached: int = 0
    called: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    backend: str = ""

    def summary(self):
        return (f"LLM generation [{self.backend}]: {self.requested} requested, {self.cached} cached, "
                f"{self.called} calls sent, {self.retries} retries, {self.failed} failed, "
                f"tokens {self.prompt_tokens} prompt + {self.completion_tokens} completion, "
                f"{self.seconds:.1f} s")


class _Tally:
    """Thread-safe increments of a report's counters (worker threads report concurrently)."""

    def __init__(self, report):
        self.report = report
        self._lock = threading.Lock()

    def add(self, **counts):
        """Add ``counts``; -> the new value of the last counter named."""
        with self._lock:
            for name, value in counts.items():
                setattr(self.report, name, getattr(self.report, name) + value)
            return getattr(self.report, name)


def _option(config, key, default):
    """config[key] for RecBole's Config (None when missing) and for plain dicts alike."""
    try:
        value = config[key]
    except KeyError:
        value = None
    return default if value is None else value


@dataclass(frozen=True)
class LLMSettings:
    """The ``llm_*`` config keys with their defaults (see the module docstring)."""

    backend: str = "none"
    model: str = None
    base_url: str = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 1.0
    max_tokens: int = 512
    temperature: float = 0.0
    system_prompt: str = None
    batch_size: int = 8
    replay_file: str = None
    device: object = "cpu"

    @classmethod
    def from_config(cls, config):
        defaults = {f.name: f.default for f in fields(cls)}
        values = {name: _option(config, "device" if name == "device" else f"llm_{name}", default)
                  for name, default in defaults.items()}
        for name in ("concurrency", "max_retries", "max_tokens", "batch_size"):
            values[name] = int(values[name])
        for name in ("timeout", "backoff", "temperature"):
            values[name] = float(values[name])
        values["backend"] = str(values["backend"]).lower()
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self):
        if self.backend not in BACKENDS:
            raise GenerationError(f"llm_backend={self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        for name in ("concurrency", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise GenerationError(f"llm_{name} must be at least 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise GenerationError("llm_max_retries and llm_backoff must be >= 0 and llm_timeout > 0")

    def require_model(self, what):
        if not self.model:
            raise GenerationError(f"llm_backend={self.backend} needs llm_model: {what}")
        return str(self.model)

    def messages(self, prompt):
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": prompt}]

    def hash(self, backend, model, messages):
        return request_hash(backend, model, messages, self.max_tokens, self.temperature)


def make_backend(config, cache_dir):
    """The backend ``config`` asks for; LLM backends keep their cache in ``cache_dir``."""
    settings = LLMSettings.from_config(config)
    if settings.backend == "none":
        return NoneBackend()
    if settings.backend == "replay":
        return ReplayBackend(settings)
    if settings.backend == "openai":
        return OpenAIBackend(settings, LLMCache(cache_dir))
    return HFBackend(settings, LLMCache(cache_dir))


# --- none ---------------------------------------------------------------------------------------


class NoneBackend:
    """No LLM: the description is the knowledge (a baseline, and the offline default)."""

    name = "none"
    model_id = "none"

    def __init__(self):
        self._warned = False

    def generate(self, requests):
        if not self._warned:
            logging.getLogger().warning(
                "llm_backend=none: no LLM is used; each user's and item's plain description is itself the "
                "knowledge text. Set llm_backend to openai, hf or replay to generate knowledge with an LLM.")
            self._warned = True
        answers = {r.key: r.description for r in requests}
        return answers, GenerationReport(requested=len(requests), backend=self.name)


# --- cached LLM backends ------------------------------------------------------------------------


@dataclass
class _Job:
    """One distinct prompt to generate, and every request key waiting for its answer."""

    hash: str
    messages: list
    prompt: str
    keys: list = field(default_factory=list)


class _CachedBackend:
    """Shared flow of the LLM backends: serve from the cache, generate the rest once per distinct
    prompt (each answer cached on arrival), then report what failed."""

    name = None

    def __init__(self, settings, cache):
        self.settings = settings
        self.cache = cache

    @property
    def model_id(self):
        return str(self.settings.model)

    def generate(self, requests):
        start = time.time()
        report = GenerationReport(requested=len(requests), backend=self.name)
        answers, jobs = {}, {}
        for request in requests:
            messages = self.settings.messages(request.prompt)
            hash_ = self.settings.hash(self.name, self.model_id, messages)
            cached = self.cache.get(hash_)
            if cached is not None:
                answers[request.key] = cached
                report.cached += 1
            else:
                jobs.setdefault(hash_, _Job(hash_, messages, request.prompt)).keys.append(request.key)
        failures = self._run(list(jobs.values()), _Tally(report)) if jobs else {}
        for job in jobs.values():
            answer = self.cache.get(job.hash)
            if answer is not None:
                answers.update(dict.fromkeys(job.keys, answer))
        report.failed = sum(len(jobs[h].keys) for h in failures)
        report.seconds = round(time.time() - start, 3)
        if failures:
            raise self._failure_error(failures, jobs, answers, report)
        return answers, report

    def _run(self, jobs, tally):
        """Generate ``jobs``, caching each answer as it arrives; -> {hash: error} of failures."""
        raise NotImplementedError

    def _failure_error(self, failures, jobs, answers, report):
        failed_keys = [key for h in failures for key in jobs[h].keys]
        first_hash = next(iter(failures))
        logging.getLogger().error(f"{len(failed_keys)} requests got no answer, e.g. {', '.join(failed_keys[:5])}")
        return GenerationError(
            f"{len(failed_keys)} of {report.requested} requests got no answer from the {self.name} backend "
            f"(first: {jobs[first_hash].keys[0]}: {failures[first_hash]}). The {len(answers)} other answers "
            f"are cached in {self.cache.path}; rerunning sends only the {len(failures)} missing prompts.",
            report=report)


class _Malformed(Exception):
    """The endpoint answered, but with no usable text."""


def _answer_text(response):
    choices = getattr(response, "choices", None)
    if not choices:
        raise _Malformed("no choices in the answer")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(content, str) or not content.strip():
        raise _Malformed("empty answer content")
    return content.strip()


def _usage(response):
    usage = getattr(response, "usage", None)
    if usage is None:
        return None
    return {"prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
            "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}


def _retry_after(exc):
    """Seconds a 429/503 asks us to wait (Retry-After header), or None."""
    try:
        return float(exc.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


def _public_url(url):
    """``url`` without user:password or query (either may carry a credential)."""
    if not url:
        return "https://api.openai.com/v1 (the openai default)"
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _is_local(url):
    host = (urlsplit(str(url)).hostname or "") if url else ""
    return host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.")


class _AbortRun(Exception):
    """A configuration error (auth, wrong endpoint/model): every further call would fail too."""


class OpenAIBackend(_CachedBackend):
    """Any OpenAI-compatible chat-completions endpoint, concurrent, with our own retries.

    The SDK's retries are off (``max_retries=0``) so that every attempt is counted and the
    backoff, the retry budget and what is retried are the ones documented here."""

    name = "openai"

    def __init__(self, settings, cache):
        super().__init__(settings, cache)
        settings.require_model("the model name, e.g. gpt-3.5-turbo or the name a vLLM server serves")
        self._rng = random.Random()
        self._api_key = None

    @property
    def endpoint(self):
        return _public_url(self.settings.base_url)

    def _resolve_api_key(self):
        """The key from ``llm_api_key_env``; read only when a call is needed, so cached runs and
        batch imports work without one."""
        env = self.settings.api_key_env
        key = os.environ.get(env)
        if key:
            return key
        if _is_local(self.settings.base_url):
            return "EMPTY"  # local servers (vLLM, Ollama) accept any key
        raise GenerationError(
            f"llm_backend=openai needs an API key for {self.endpoint}: set the environment variable {env} "
            f"(or name another variable with llm_api_key_env).")

    def _redact(self, text):
        key = self._api_key
        if key and key != "EMPTY" and len(key) >= 4:
            text = text.replace(key, "***")
        return text

    def _client(self):
        import openai

        self._api_key = self._resolve_api_key()
        return openai.OpenAI(base_url=self.settings.base_url, api_key=self._api_key,
                             timeout=self.settings.timeout, max_retries=0)

    def _run(self, jobs, tally):
        client = self._client()
        stop = threading.Event()
        failures = {}
        bar = tqdm(total=len(jobs), desc=f"LLM {self.model_id}", unit="prompt")
        pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="llm")
        try:
            futures = {pool.submit(self._answer, client, job, tally, stop): job for job in jobs}
            for future in as_completed(futures):
                error = future.result()
                if error is not None:
                    failures[futures[future].hash] = error
                bar.update(1)
        except _AbortRun as exc:
            stop.set()
            raise GenerationError(str(exc), report=tally.report) from None
        except BaseException:
            stop.set()  # Ctrl-C: stop sending; answers already received are cached
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return failures

    def _answer(self, client, job, tally, stop):
        """Ask for one prompt with retries; cache the answer. -> None, or why it failed."""
        import openai

        for attempt in range(self.settings.max_retries + 1):
            if stop.is_set():
                return "cancelled"
            tally.add(called=1)
            wait = None
            try:
                response = client.chat.completions.create(
                    model=self.model_id, messages=job.messages, max_tokens=self.settings.max_tokens,
                    temperature=self.settings.temperature)
                answer = _answer_text(response)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in ABORT_STATUSES:
                    raise _AbortRun(self._abort_message(status, exc)) from None
                error = self._redact(f"HTTP {status}: {exc.message}")[:300]
                if not (status in (408, 429) or status >= 500):
                    return error  # a 4xx like 400 will not change on retry
                wait = _retry_after(exc)
            except openai.APITimeoutError:
                error = f"timed out after {self.settings.timeout:g} s"
            except openai.APIConnectionError as exc:
                error = self._redact(f"connection error: {exc}")[:300]
            except (_Malformed, ValueError, openai.APIResponseValidationError) as exc:
                error = self._redact(f"malformed answer: {exc}")[:300]
            else:
                usage = _usage(response)
                self.cache.put(job.hash, job.keys[0], self.model_id, job.prompt, answer, usage)
                if usage:
                    tally.add(**usage)
                return None
            if attempt == self.settings.max_retries:
                return f"{error} (after {attempt} retries)"
            first_retry = tally.add(retries=1) == 1
            logging.getLogger().log(  # once visibly (rate limits are worth knowing about), then quietly
                logging.WARNING if first_retry else logging.DEBUG,
                f"LLM endpoint {self.endpoint}: {error} for {job.keys[0]}; retrying with backoff"
                + (" (further retries are logged at debug level)" if first_retry else ""))
            stop.wait(self._delay(attempt, wait))
        raise AssertionError("the last attempt always returns")

    def _delay(self, attempt, retry_after):
        """Exponential backoff with jitter (so concurrent workers don't retry in lockstep)."""
        delay = min(MAX_BACKOFF, self.settings.backoff * 2 ** attempt) * (0.5 + 0.5 * self._rng.random())
        if retry_after:
            delay = max(delay, min(MAX_BACKOFF, retry_after))
        return delay

    def _abort_message(self, status, exc):
        detail = self._redact(str(exc.message))[:300]
        return (f"The LLM endpoint {self.endpoint} answered HTTP {status} ({ABORT_STATUSES[status]}): {detail}. "
                f"Nothing more was sent. Check the API key in the environment variable "
                f"{self.settings.api_key_env} (llm_api_key_env), llm_base_url and llm_model={self.model_id}. "
                f"Answers received before this are cached in {self.cache.path}.")


class HFBackend(_CachedBackend):
    """A local transformers causal LM, generating in batches (left-padded, new tokens only).

    The model loads on the first prompt that is not cached, so a fully cached run never pays
    for loading it."""

    name = "hf"

    def __init__(self, settings, cache):
        super().__init__(settings, cache)
        settings.require_model("a local transformers causal-LM folder")
        self._model = None
        self._tokenizer = None

    @property
    def model_id(self):
        return os.path.normpath(str(self.settings.model))

    def _load(self):
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.settings.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
            model = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise GenerationError(f"llm_model={path!r} could not be loaded as a transformers causal LM "
                                  f"(llm_backend=hf): {exc}") from exc
        tokenizer.padding_side = "left"  # generation continues right after the prompt
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._device = torch.device(self.settings.device or "cpu")
        self._tokenizer, self._model = tokenizer, model.to(self._device).eval()

    def _render(self, messages):
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def _run(self, jobs, tally):
        self._load()
        jobs = sorted(jobs, key=lambda job: len(job.prompt))  # similar lengths: less padding
        size, empty = self.settings.batch_size, 0
        with tqdm(total=len(jobs), desc=f"LLM {os.path.basename(self.model_id)}", unit="prompt") as bar:
            for begin in range(0, len(jobs), size):
                batch = jobs[begin:begin + size]
                for job, (answer, usage) in zip(batch, self._generate_batch(batch)):
                    # Cached even when empty: greedy decoding would only say the same again.
                    self.cache.put(job.hash, job.keys[0], self.model_id, job.prompt, answer, usage)
                    tally.add(called=1, **usage)
                    empty += not answer
                bar.update(len(batch))
        if empty:
            logging.getLogger().warning(f"{empty} of {len(jobs)} answers of {self.model_id} are empty; check that "
                                        f"it is an instruction-tuned model and that llm_max_tokens is large enough")
        return {}

    def _generate_batch(self, batch):
        import torch

        tokenizer = self._tokenizer
        templated = bool(getattr(tokenizer, "chat_template", None))
        texts = [self._render(job.messages) for job in batch]
        # A chat template already holds the special tokens; adding them again would double BOS.
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
        encoded = {name: tensor.to(self._device) for name, tensor in encoded.items()}
        options = {"max_new_tokens": self.settings.max_tokens, "pad_token_id": tokenizer.pad_token_id,
                   "do_sample": self.settings.temperature > 0}
        if options["do_sample"]:
            options["temperature"] = self.settings.temperature
        with torch.no_grad():
            output = self._model.generate(**encoded, **options)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompt_counts = encoded["attention_mask"].sum(dim=1).tolist()
        completion_counts = (new_tokens != tokenizer.pad_token_id).sum(dim=1).tolist()
        return [(answer.strip(), {"prompt_tokens": int(p), "completion_tokens": int(c)})
                for answer, p, c in zip(answers, prompt_counts, completion_counts)]


# --- replay -------------------------------------------------------------------------------------


def _completion_content(response):
    """Text of an OpenAI-style completion dict (also a batch result's ``{"body": ...}``)."""
    if isinstance(response, dict) and isinstance(response.get("body"), dict):
        response = response["body"]
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _recorded_pair(record):
    """(prompt, response) of one recorded line in any accepted shape, or None."""
    if not isinstance(record, dict):
        return None
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        messages = record.get("messages") or (record.get("body") or {}).get("messages") or []
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    response = record.get("response", record.get("completion"))
    if not isinstance(response, str):
        response = _completion_content(response)
    if not isinstance(prompt, str) or response is None:
        return None
    return prompt, response


def load_recordings(path):
    """{stripped prompt: response} from a JSONL recording (cache files and OpenAI-style records
    included); unreadable lines are skipped with one warning."""
    if not path or not os.path.isfile(path):
        raise GenerationError(f"llm_backend=replay needs llm_replay_file to name a recorded JSONL file; "
                              f"got {path!r}. Record answers first (the openai or hf backend's "
                              f"llm_cache.jsonl can be replayed as is).")
    recordings, bad = {}, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                pair = _recorded_pair(json.loads(line))
            except ValueError:
                pair = None
            if pair is None:
                bad.append(number)
            else:
                recordings[pair[0].strip()] = pair[1]
    if bad:
        logging.getLogger().warning(f"{path}: skipped {len(bad)} lines without a prompt and a response "
                                    f"(first: line {bad[0]})")
    return recordings


class ReplayBackend:
    """Answers recorded earlier, looked up by exact prompt text: reproducible runs, no LLM.

    Not cached: the recording already is the durable copy."""

    name = "replay"

    def __init__(self, settings):
        self.path = settings.replay_file
        self.recordings = load_recordings(self.path)
        self.model_id = str(settings.model or f"replay:{os.path.basename(self.path)}")

    def generate(self, requests):
        start = time.time()
        missing = [r for r in requests if r.prompt.strip() not in self.recordings]
        if missing:
            first = missing[0]
            raise GenerationError(
                f"{len(missing)} of {len(requests)} prompts have no recorded answer in {self.path} "
                f"(llm_replay_file). First missing: {first.key}: {first.prompt.strip()[:200]!r}. Record them "
                f"(run once with llm_backend=openai or hf and replay its llm_cache.jsonl) or use another backend.")
        answers = {r.key: self.recordings[r.prompt.strip()] for r in requests}
        report = GenerationReport(requested=len(requests), cached=len(requests), backend=self.name,
                                  seconds=round(time.time() - start, 3))
        return answers, report


# --- batch export / import ----------------------------------------------------------------------


def _batch_jobs(config, cache_dir, requests):
    """(settings, cache, {hash: _Job}) for the openai backend the batch stands in for."""
    settings = LLMSettings.from_config(config)
    if settings.backend != "openai":
        raise GenerationError(f"batch files are for llm_backend=openai (got {settings.backend}): set "
                              f"llm_backend=openai and llm_model to the model the batch runs on, so that "
                              f"the imported answers are found by the openai backend.")
    model = settings.require_model("the model the batch runs on")
    jobs = {}
    for request in requests:
        messages = settings.messages(request.prompt)
        hash_ = settings.hash("openai", model, messages)
        jobs.setdefault(hash_, _Job(hash_, messages, request.prompt)).keys.append(request.key)
    return settings, LLMCache(cache_dir), jobs


def export_batch(config, cache_dir, requests, path):
    """Write the requests not yet cached as an OpenAI Batch API / ``vllm run-batch`` input file.

    Each distinct prompt is one line; its ``custom_id`` is the cache hash, which is how
    :func:`import_batch` files the answer. -> the number of lines written."""
    settings, cache, jobs = _batch_jobs(config, cache_dir, requests)
    todo = [job for job in jobs.values() if job.hash not in cache]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for job in todo:
            body = {"model": settings.model, "messages": job.messages, "max_tokens": settings.max_tokens,
                    "temperature": settings.temperature}
            line = {"custom_id": job.hash, "method": "POST", "url": BATCH_URL, "body": body}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    logging.getLogger().info(
        f"wrote {len(todo)} batch requests to {path} ({len(jobs) - len(todo)} already cached); run them with "
        f"the OpenAI Batch API or `vllm run-batch -i {path} -o results.jsonl --model ...`, then import_batch")
    return len(todo)


def import_batch(config, cache_dir, requests, results_path):
    """Store a batch results file's successful answers in the cache, filed under their hash.

    -> counts ``{"imported", "already_cached", "failed", "unknown"}``. ``unknown``: lines whose
    custom_id matches none of ``requests`` (another job's results, or different settings)."""
    settings, cache, jobs = _batch_jobs(config, cache_dir, requests)
    counts = {"imported": 0, "already_cached": 0, "failed": 0, "unknown": 0}
    errors = []
    with open(results_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            outcome, error = _import_line(line, jobs, cache, settings.model)
            counts[outcome] += 1
            if error:
                errors.append(f"line {number}: {error}")
    logger = logging.getLogger()
    logger.info(f"imported {counts['imported']} answers from {results_path} into {cache.path} ({counts})")
    if errors:
        logger.warning(f"{len(errors)} batch results were not usable; those prompts will be generated (or "
                       f"exported) again: {'; '.join(errors[:3])}")
    return counts


def _import_line(line, jobs, cache, model):
    """-> (outcome, error or None) for one batch result line."""
    try:
        result = json.loads(line)
        custom_id = result.get("custom_id")
    except (ValueError, AttributeError):
        return "failed", "not a JSON object"
    job = jobs.get(custom_id)
    if job is None:
        return "unknown", f"custom_id {str(custom_id)[:16]} matches no request"
    if job.hash in cache:
        return "already_cached", None
    response = result.get("response")
    response = response if isinstance(response, dict) else {}
    if result.get("error") or response.get("status_code") != 200:
        error = result.get("error") or f"status {response.get('status_code')}"
        return "failed", f"{job.keys[0]}: {str(error)[:200]}"
    content = _completion_content(response)
    if content is None or not content.strip():
        return "failed", f"{job.keys[0]}: no answer content"
    usage = (response.get("body") or {}).get("usage") or None
    if usage:
        usage = {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0)}
    cache.put(job.hash, job.keys[0], str(model), job.prompt, content.strip(), usage)
    return "imported", None
