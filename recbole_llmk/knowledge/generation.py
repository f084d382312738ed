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
  hf       a local transformers causal LM (a model folder or a GGUF file: local_llm.py), batched,
           on ``config["device"]``.
  replay   answers recorded earlier (a JSONL file); a prompt without a recording is an error.

For large jobs, :func:`export_batch` writes the missing prompts as an OpenAI Batch API /
``vllm run-batch`` input file and :func:`import_batch` loads its results into the cache; the next
``generate`` then sends nothing.

Config keys (all optional; a missing key or ``None`` means its default, in
``recbole_llmk/properties/overall.yaml``, the one place defaults are written):
  llm_backend        none | openai | hf | replay
  llm_model          openai: the model name, e.g. gpt-3.5-turbo (required);
                     hf: a local transformers model folder or GGUF file (required); replay: only a label
  llm_base_url       openai: endpoint, e.g. http://localhost:8000/v1 (default: OpenAI's own)
  llm_api_key_env    environment variable holding the API key
                     The key is read from it, never logged or stored. When it is unset and the
                     endpoint is local (localhost / 127.x), the key "EMPTY" is used.
  llm_concurrency    openai: parallel requests at most; fewer when the server says it has fewer
                     slots (llama.cpp's /props), and halved each time requests time out waiting
                     in a server's queue (a serial server)
  llm_timeout        openai: seconds per request, the whole answer included (a server that
                     drips bytes cannot hold one longer)
  llm_max_retries    openai: retries per prompt on 429, 5xx, timeouts, connection errors and
                     malformed or empty answers; then the prompt fails
  llm_max_consecutive_failures  openai: calls in a row that get no answer (connection errors,
                     timeouts, 5xx, answers that are not an LLM's; 429 aside) before the run stops
                     with what is cached: a dead or wrong endpoint fails in seconds, not after
                     every prompt's retries
  llm_backoff        openai: base seconds of the exponential backoff (with jitter, capped at
                     60 s; a server's Retry-After is honoured)
  llm_max_tokens     answer length limit; an answer that hits it is recorded with
                     finish_reason "length" and counted as truncated
  llm_temperature    0 means greedy / deterministic
  llm_repetition_penalty  hf: transformers' repetition_penalty (e.g. 1.2: small models loop
                     without one); part of the cache key when set
  llm_on_bad_answer  what to do with an answer the gate (answer_quality.py) finds empty, a
                     refusal, a loop or an echo of the prompt: keep (store it, counted and
                     logged), retry (ask again up to llm_bad_answer_retries times at
                     llm_bad_answer_temperature, then keep the last answer, flagged) or fail (stop
                     with an error naming the requests; every answer stays cached)
  llm_bad_answer_retries       retry: extra asks per bad answer
  llm_bad_answer_temperature   retry: sampling temperature of those asks (greedy decoding would
                     say the same again)
  llm_system_prompt  optional system message sent before every prompt
  llm_batch_size     hf: prompts per generate() batch
  llm_replay_file    replay: the recorded JSONL file (required for replay)
  device             hf: a torch device or its name

The model, the messages (system prompt included), max_tokens, temperature and (when set) the
repetition penalty identify a cached answer; changing any of them asks again. The endpoint and the
key do not. An endpoint that lists its models (GET /models) must list llm_model: a server that
answers to any name (llama.cpp) would otherwise file its own model's answers under that name.
"""

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from urllib.parse import parse_qsl, urlsplit

from tqdm import tqdm

from recbole_llmk.defaults import setting
from recbole_llmk.knowledge.answer_quality import VERDICTS, assess
from recbole_llmk.knowledge.deadline import http_client
from recbole_llmk.knowledge.llm_cache import LLMCache, request_hash
from recbole_llmk.knowledge.local_llm import load_causal_lm, model_identity
from recbole_llmk.logs import public_url, redact, url_secrets

BACKENDS = ("none", "openai", "hf", "replay")
BAD_ANSWER_POLICIES = ("keep", "retry", "fail")
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
    # ``truncated``: answers that hit llm_max_tokens; ``flagged``: {verdict: requests} whose answer
    # the gate found bad (after any retries); ``bad_answer_retries``: asks made again for them.
    truncated: int = 0
    flagged: dict = field(default_factory=dict)
    bad_answer_retries: int = 0

    def summary(self):
        text = (f"LLM generation [{self.backend}]: {self.requested} requested, {self.cached} cached, "
                f"{self.called} calls sent, {self.retries} retries, {self.failed} failed, "
                f"tokens {self.prompt_tokens} prompt + {self.completion_tokens} completion, {self.seconds:.1f} s")
        if self.backend == "none":  # descriptions: nothing was generated, nothing to judge
            return text
        flagged = ", ".join(f"{count} {verdict}" for verdict, count in sorted(self.flagged.items())) or "none"
        return (f"{text}; {self.truncated} truncated at llm_max_tokens; bad answers: {flagged} "
                f"({self.bad_answer_retries} asked again)")


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


@dataclass(frozen=True)
class LLMSettings:
    """The ``llm_*`` settings (defaults: ``properties/overall.yaml``; the module docstring says what
    each does) and RecBole's ``device``."""

    backend: str
    model: str
    base_url: str
    api_key_env: str
    concurrency: int
    timeout: float
    max_retries: int
    max_consecutive_failures: int
    backoff: float
    max_tokens: int
    temperature: float
    repetition_penalty: float
    on_bad_answer: str
    bad_answer_retries: int
    bad_answer_temperature: float
    system_prompt: str
    batch_size: int
    replay_file: str
    device: object

    @classmethod
    def from_config(cls, config):
        values = {f.name: setting(config, f"llm_{f.name}") for f in fields(cls) if f.name != "device"}
        values["device"] = (config["device"] if "device" in config else None) or "cpu"
        for name in ("concurrency", "max_retries", "max_tokens", "batch_size", "bad_answer_retries",
                     "max_consecutive_failures"):
            values[name] = int(values[name])
        for name in ("timeout", "backoff", "temperature", "bad_answer_temperature"):
            values[name] = float(values[name])
        if values["repetition_penalty"] is not None:
            values["repetition_penalty"] = float(values["repetition_penalty"])
        values["backend"] = str(values["backend"]).lower()
        values["on_bad_answer"] = str(values["on_bad_answer"]).lower()
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self):
        if self.backend not in BACKENDS:
            raise GenerationError(f"llm_backend={self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        for name in ("concurrency", "batch_size", "max_tokens", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise GenerationError(f"llm_{name} must be at least 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise GenerationError("llm_max_retries and llm_backoff must be >= 0 and llm_timeout > 0")
        if self.on_bad_answer not in BAD_ANSWER_POLICIES:
            raise GenerationError(f"llm_on_bad_answer={self.on_bad_answer!r} is unknown; choose one of "
                                  f"{', '.join(BAD_ANSWER_POLICIES)}")
        if self.bad_answer_retries < 0 or self.bad_answer_temperature < 0:
            raise GenerationError("llm_bad_answer_retries and llm_bad_answer_temperature must be >= 0")
        if self.repetition_penalty is not None and (self.repetition_penalty <= 0 or self.backend != "hf"):
            raise GenerationError(
                f"llm_repetition_penalty={self.repetition_penalty} is for llm_backend=hf and must be > 0 (1.0 is "
                f"none); a server applies its own (llama.cpp: --repeat_penalty, on by default)")

    def require_model(self, what):
        if not self.model:
            raise GenerationError(f"llm_backend={self.backend} needs llm_model: {what}")
        return str(self.model)

    def messages(self, prompt):
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": prompt}]

    def hash(self, backend, model, messages):
        return request_hash(backend, model, messages, self.max_tokens, self.temperature,
                            repetition_penalty=self.repetition_penalty)

    @property
    def retry_temperature(self):
        return max(self.temperature, self.bad_answer_temperature)


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
    """One distinct prompt to generate, and every request key waiting for its answer.

    ``attempt`` 2 and up: asked again after a bad answer, at ``temperature`` (None: the
    configured llm_temperature)."""

    hash: str
    messages: list
    prompt: str
    keys: list = field(default_factory=list)
    attempt: int = 1
    temperature: float = None

    def record_fields(self, verdict=None):
        """The cache record's optional fields for this job's answer (see llm_cache.py)."""
        retried = self.attempt > 1
        return {"verdict": verdict, "attempt": self.attempt if retried else None,
                "temperature": self.temperature if retried else None}


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
        tally = _Tally(report)
        self.cache.refresh()  # what other processes sharing the cache answered since it was opened
        jobs = {}
        for request in requests:
            messages = self.settings.messages(request.prompt)
            hash_ = self.settings.hash(self.name, self.model_id, messages)
            jobs.setdefault(hash_, _Job(hash_, messages, request.prompt)).keys.append(request.key)
        todo = [job for job in jobs.values() if self._wants_answer(job)]
        report.cached = report.requested - sum(len(job.keys) for job in todo)
        report.bad_answer_retries = sum(job.attempt > 1 for job in todo)  # bad answers cached by an earlier run
        failures = {}
        while todo:  # a first round, then one per retry of bad answers
            failures.update(self._run(todo, tally))
            todo = [job for job in todo if job.hash not in failures and self._wants_answer(job)]
            report.bad_answer_retries += len(todo)
        answers, flagged = {}, []
        for job in jobs.values():
            record = self.cache.record(job.hash)
            if record is None:
                continue
            answers.update(dict.fromkeys(job.keys, record["response"]))
            report.truncated += len(job.keys) * (record.get("finish_reason") == "length")
            verdict = assess(record["response"], job.prompt)
            if verdict:
                flagged.append((job.keys, verdict, record["response"]))
        report.failed = sum(len(jobs[h].keys) for h in failures)
        report.seconds = round(time.time() - start, 3)
        gate_answers(flagged, report, self.settings, f"the answer cache {self.cache.path}")
        if failures:
            raise self._failure_error(failures, jobs, answers, report)
        return answers, report

    def _wants_answer(self, job):
        """Whether ``job`` must be asked (again): no cached answer yet, or a bad one that the
        ``retry`` policy may still ask again. Sets the job's attempt and temperature for it."""
        record = self.cache.record(job.hash)
        if record is None:
            return True
        attempt = int(record.get("attempt") or 1)
        if self.settings.on_bad_answer != "retry" or attempt > self.settings.bad_answer_retries:
            return False
        if assess(record["response"], job.prompt) is None:
            return False
        job.attempt, job.temperature = attempt + 1, self.settings.retry_temperature
        return True

    def _answered_elsewhere(self, job, tally):
        """Under the job's claim: whether another process sharing the cache answered it (this
        attempt) while this one waited; its answer then counts as cached."""
        record = self.cache.record(job.hash)
        if record is None or int(record.get("attempt") or 1) < job.attempt:
            return False
        tally.add(cached=len(job.keys))
        return True

    def _temperature(self, job):
        return self.settings.temperature if job.temperature is None else job.temperature

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


def gate_answers(flagged, report, settings, where, can_ask_again=True):
    """Count bad answers in ``report``, log a few, and stop under ``llm_on_bad_answer: fail``.

    ``flagged``: ``[(request keys, verdict, answer)]`` as :func:`answer_quality.assess` judged
    them; ``where``: where the answers stay (for the message); ``can_ask_again``: False for
    recorded answers, which ``retry`` cannot replace."""
    if not flagged:
        return
    counts = {verdict: 0 for verdict in VERDICTS}
    for keys, verdict, _ in flagged:
        counts[verdict] += len(keys)
    report.flagged = {verdict: count for verdict, count in counts.items() if count}
    total = sum(report.flagged.values())
    what = ", ".join(f"{count} {verdict}" for verdict, count in report.flagged.items())
    examples = "; ".join(f"{keys[0]} ({verdict}): {' '.join(answer.split())[:160]!r}"
                         for keys, verdict, answer in flagged[:3])
    message = (f"{total} of {report.requested} LLM answers are not usable knowledge ({what}; "
               f"recbole_llmk/knowledge/answer_quality.py explains each), e.g. {examples}.")
    policy = settings.on_bad_answer
    if policy == "fail":
        raise GenerationError(
            f"{message} llm_on_bad_answer=fail: stopped before encoding them. Every answer stays in {where}; "
            f"rerun with llm_on_bad_answer=retry (ask again at llm_bad_answer_temperature) or keep, or use "
            f"another llm_model or prompt.", report=report)
    if policy == "retry" and not can_ask_again:
        action = "kept as knowledge: recorded answers cannot be asked again (llm_on_bad_answer=fail stops instead)"
    elif policy == "retry":
        action = (f"asked again up to {settings.bad_answer_retries} times (llm_bad_answer_retries) at temperature "
                  f"{settings.retry_temperature:g}; these stayed bad and are kept as knowledge")
    else:
        action = "kept as knowledge (llm_on_bad_answer=keep; retry asks again, fail stops)"
    logging.getLogger().warning(f"{message} They were {action}.")


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


def _prompt_size(job, status):
    """What a 400 needs to be understood: how long the prompt was (a local server's context is
    often shorter than a long history)."""
    if status != 400:
        return ""
    return (f" (the prompt has {len(job.prompt)} characters: if the server's context is shorter, lower "
            f"history_length or raise the server's context size, e.g. llama.cpp --n_ctx)")


def _retry_after(exc):
    """Seconds a 429/503 asks us to wait (Retry-After header), or None."""
    try:
        return float(exc.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


def _is_local(url):
    host = (urlsplit(str(url)).hostname or "") if url else ""
    return host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.")


class _AbortRun(Exception):
    """A configuration error (auth, wrong endpoint/model): every further call would fail too."""


class _Breaker:
    """Calls in a row, across all workers, that got no answer; one answer resets it."""

    def __init__(self, limit):
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def success(self):
        with self._lock:
            self.count = 0

    def failure(self):
        """Count one failed call; -> whether the limit is reached."""
        with self._lock:
            self.count += 1
            return self.count >= self.limit


class _InFlightLimit:
    """How many requests may be in flight at once; halved when requests time out in a queue.

    A serial server (llama-cpp-python's, one request at a time) answers N concurrent requests one
    after the other, so the last ones time out while they wait, and the server still spends the
    time on them. ``slot()`` hands out the limit's *round*: one burst of queue timeouts (all sent
    under the same limit) halves the limit once, not once per request."""

    def __init__(self, limit):
        self.limit = limit
        self.round = 0
        self._in_flight = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self):
        """Wait for a free slot; yields (round, limit) as they were when it was taken."""
        with self._cond:
            while self._in_flight >= self.limit:
                self._cond.wait()
            self._in_flight += 1
            taken = (self.round, self.limit)
        try:
            yield taken
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def shrink(self, round_):
        """Halve the limit if ``round_`` is still current. -> the new limit, or None."""
        with self._cond:
            if round_ != self.round or self.limit == 1:
                return None
            self.limit, self.round = max(1, self.limit // 2), self.round + 1
            return self.limit


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
        self._limit = None  # the in-flight limit, set on the first call from what the server says

    @property
    def endpoint(self):
        return public_url(self.settings.base_url)

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
        secrets = url_secrets(self.settings.base_url)
        key = self._api_key
        if key and key != "EMPTY" and len(key) >= 4:
            secrets[key] = "***"
        return redact(text, secrets)

    def _client(self):
        import openai

        self._api_key = self._resolve_api_key()
        # llm_timeout bounds the whole answer, not only each wait for its next bytes (deadline.py).
        client = http_client(self.settings.timeout, max_connections=2 * self.settings.concurrency)
        # A query in the URL (e.g. Azure-style ?api-key=...) goes with every request, after the path
        # the SDK appends (given in base_url, the SDK would put the path after the query).
        base_url, query = self.settings.base_url, None
        if base_url and urlsplit(str(base_url)).query:
            parts = urlsplit(str(base_url))
            base_url, query = parts._replace(query="").geturl(), dict(parse_qsl(parts.query))
        return openai.OpenAI(base_url=base_url, api_key=self._api_key, default_query=query,
                             timeout=self.settings.timeout, max_retries=0, http_client=client)

    def _check_server(self, client):
        """Once per run, before the first call: the model the endpoint lists must be llm_model
        (-> error), and a server that says how many requests it runs at once (llama.cpp's /props
        ``total_slots``) caps the in-flight limit. Endpoints that say neither are taken as they are."""
        served = self._listed_models(client)
        if served and self.model_id not in served and f"{self.model_id}:latest" not in served:
            raise GenerationError(
                f"The LLM endpoint {self.endpoint} serves {', '.join(sorted(served)[:5])}, not llm_model="
                f"{self.model_id}. A server that answers to any model name (llama.cpp) would answer with its own "
                f"model and the cache would file the answers under {self.model_id}: set llm_model to the name the "
                f"server lists (llama.cpp: its --model_alias, or the model path).")
        limit, slots = self.settings.concurrency, self._server_slots()
        if slots and slots < limit:
            logging.getLogger().info(f"LLM endpoint {self.endpoint} runs {slots} requests at once (/props "
                                     f"total_slots): sending at most {slots} at a time (llm_concurrency={limit})")
            limit = slots
        self._limit = _InFlightLimit(limit)

    def _listed_models(self, client):
        try:
            return {model.id for model in client.models.list()}
        except Exception as exc:  # many endpoints list nothing; the calls themselves report real errors
            logging.getLogger().debug(f"LLM endpoint {self.endpoint}: GET /models gave no list ({type(exc).__name__})")
            return set()

    def _server_slots(self):
        """llama.cpp server's ``total_slots`` (GET <root>/props), or None."""
        from urllib.request import urlopen

        if not self.settings.base_url:
            return None
        root = str(self.settings.base_url).rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root
        try:
            with urlopen(f"{root}/props", timeout=min(5.0, self.settings.timeout)) as answer:
                slots = json.loads(answer.read(1 << 20)).get("total_slots")
        except Exception:  # not llama.cpp's server
            return None
        return int(slots) if isinstance(slots, int) and slots > 0 else None

    def _run(self, jobs, tally):
        client = self._client()
        if self._limit is None:
            self._check_server(client)
        self._breaker = _Breaker(self.settings.max_consecutive_failures)
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
        """Ask for one prompt under its claim, unless another process answered it meanwhile.
        -> None, or why it failed."""
        with self.cache.claim(job.hash):
            if self._answered_elsewhere(job, tally):
                return None
            return self._ask(client, job, tally, stop)

    def _ask(self, client, job, tally, stop):
        """Ask with retries; cache the answer. -> None, or why it failed.

        A timeout of a request sent while several were in flight is the server's queue, not the
        prompt: it halves the in-flight limit and does not use up the prompt's retries."""
        import openai

        attempt = 0
        while True:
            if stop.is_set():
                return "cancelled"
            tally.add(called=1)
            wait, queued, status = None, False, None
            with self._limit.slot() as (round_, limit):
                try:
                    response = client.chat.completions.create(
                        model=self.model_id, messages=job.messages, max_tokens=self.settings.max_tokens,
                        temperature=self._temperature(job))
                    answer = _answer_text(response)
                except openai.APIStatusError as exc:
                    status = exc.status_code
                    if status in ABORT_STATUSES:
                        raise _AbortRun(self._abort_message(status, exc)) from None
                    error = self._redact(f"HTTP {status}: {exc.message}")[:300]
                    if not (status in (408, 429) or status >= 500):
                        return error + _prompt_size(job, status)  # a 4xx like 400 will not change on retry
                    wait = _retry_after(exc)
                except openai.APITimeoutError:
                    error = f"timed out after {self.settings.timeout:g} s"
                    queued = limit > 1
                except openai.APIConnectionError as exc:
                    error = self._redact(f"connection error: {exc}")[:300]
                except (_Malformed, ValueError, openai.APIResponseValidationError) as exc:
                    error = self._redact(f"malformed answer: {exc}")[:300]
                else:
                    self._breaker.success()
                    self._keep(job, response, answer, tally)
                    return None
            # A rate limit or a server asking to wait is an endpoint at work, not a dead one.
            if not queued and status != 429 and wait is None and self._breaker.failure():
                raise _AbortRun(self._dead_endpoint_message(error))
            if queued:  # resent without using up the prompt's retries
                self._queue_timeout(round_, limit)
            elif attempt == self.settings.max_retries:
                return f"{error} (after {attempt} retries)"
            else:
                attempt += 1
            first_retry = tally.add(retries=1) == 1
            logging.getLogger().log(  # once visibly (rate limits are worth knowing about), then quietly
                logging.WARNING if first_retry else logging.DEBUG,
                f"LLM endpoint {self.endpoint}: {error} for {job.keys[0]}; retrying with backoff"
                + (" (further retries are logged at debug level)" if first_retry else ""))
            stop.wait(self._delay(max(attempt - 1, 0), wait))

    def _keep(self, job, response, answer, tally):
        """Cache one answer with what the endpoint said of it."""
        usage = _usage(response)
        choice = response.choices[0]
        self.cache.put(job.hash, job.keys[0], self.model_id, job.prompt, answer, usage,
                       finish_reason=getattr(choice, "finish_reason", None),
                       served_model=getattr(response, "model", None), **job.record_fields(assess(answer, job.prompt)))
        if usage:
            tally.add(**usage)

    def _dead_endpoint_message(self, error):
        return (f"The LLM endpoint {self.endpoint} got no answer for {self.settings.max_consecutive_failures} calls in "
                f"a row (llm_max_consecutive_failures; the last: {error}): stopped instead of retrying every prompt. "
                f"{len(self.cache)} answers are cached in {self.cache.path} and will not be asked again. Check that an "
                f"OpenAI-compatible LLM server answers there (e.g. curl {self.endpoint}/models) and llm_base_url.")

    def _queue_timeout(self, round_, limit):
        lowered = self._limit.shrink(round_)
        if lowered:
            logging.getLogger().warning(
                f"LLM endpoint {self.endpoint}: requests time out after {self.settings.timeout:g} s while {limit} are "
                f"in flight, so the server queues them (a serial server such as llama-cpp-python's answers one at a "
                f"time): now sending at most {lowered} at once. Set llm_concurrency={lowered} (or raise llm_timeout) "
                f"to start there.")

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

    ``llm_model``: a transformers folder or a GGUF file (local_llm.py). An answer stops at the
    model's end of turn (its generation config's eos tokens); one that reaches llm_max_tokens
    first is recorded with finish_reason "length". The model loads on the first prompt that is
    not cached, so a fully cached run never pays for loading it."""

    name = "hf"

    def __init__(self, settings, cache):
        super().__init__(settings, cache)
        settings.require_model("a local transformers causal-LM folder or a GGUF file")
        self._model = None
        self._tokenizer = None
        try:
            self._model_id = model_identity(settings.model)
        except (OSError, ValueError) as exc:
            raise GenerationError(f"llm_model={settings.model!r} (llm_backend=hf): {exc}") from exc

    @property
    def model_id(self):
        return self._model_id

    def _load(self):
        if self._model is not None:
            return
        import torch

        path = self.settings.model
        try:
            tokenizer, model = load_causal_lm(path)
        except (OSError, ValueError, ImportError) as exc:
            raise GenerationError(f"llm_model={path!r} could not be loaded as a transformers causal LM "
                                  f"(llm_backend=hf): {exc}") from exc
        tokenizer.padding_side = "left"  # generation continues right after the prompt
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._device = torch.device(self.settings.device or "cpu")
        self._tokenizer, self._model = tokenizer, model.to(self._device).eval()
        eos = model.generation_config.eos_token_id
        self._end_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])} - {None}

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
                with self.cache.claim(*(job.hash for job in jobs[begin:begin + size])):
                    batch = [job for job in jobs[begin:begin + size] if not self._answered_elsewhere(job, tally)]
                    for job, (answer, usage, finish_reason) in zip(batch, self._generate_batch(batch) if batch else []):
                        # Cached even when empty: the answer gate decides whether to ask again.
                        self.cache.put(job.hash, job.keys[0], self.model_id, job.prompt, answer, usage,
                                       finish_reason=finish_reason, **job.record_fields(assess(answer, job.prompt)))
                        tally.add(called=1, **usage)
                        empty += not answer
                bar.update(min(size, len(jobs) - begin))
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
        temperature = self._temperature(batch[0])  # one round's jobs share it
        options = {"max_new_tokens": self.settings.max_tokens, "pad_token_id": tokenizer.pad_token_id,
                   "do_sample": temperature > 0}
        if options["do_sample"]:
            options["temperature"] = temperature
        if self.settings.repetition_penalty is not None:
            options["repetition_penalty"] = self.settings.repetition_penalty
        with torch.no_grad():
            output = self._model.generate(**encoded, **options)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompt_counts = encoded["attention_mask"].sum(dim=1).tolist()
        ended = torch.isin(new_tokens, torch.tensor(sorted(self._end_ids), device=new_tokens.device))
        # Tokens up to and including the end of turn (pad may equal eos, so count by position).
        first_end = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, new_tokens.shape[1])
        return [(answer.strip(), {"prompt_tokens": int(p), "completion_tokens": int(c)}, "stop" if done else "length")
                for answer, p, c, done in zip(answers, prompt_counts, first_end.tolist(), ended.any(dim=1).tolist())]


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
        what = "is not set" if not path else f"names {path!r}, which " + (
            "is a folder" if os.path.isdir(path) else "does not exist")
        raise GenerationError(f"llm_backend=replay needs llm_replay_file to name a recorded JSONL file; it {what}. "
                              f"Record answers first (the openai or hf backend's llm_cache.jsonl can be replayed "
                              f"as is).")
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
        self.settings = settings
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
        flagged = [([r.key], verdict, answers[r.key]) for r in requests
                   for verdict in [assess(answers[r.key], r.prompt)] if verdict]
        gate_answers(flagged, report, self.settings, self.path, can_ask_again=False)
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
    choices = (response.get("body") or {}).get("choices") or [{}]
    finish_reason = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
    cache.put(job.hash, job.keys[0], str(model), job.prompt, content.strip(), usage, finish_reason=finish_reason,
              verdict=assess(content, job.prompt))
    return "imported", None
