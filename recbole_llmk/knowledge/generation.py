"""Generation backends: turn knowledge requests (one prompt per user/item/...) into answer texts.

Every backend answers ``backend.generate(requests) -> (answers, report)`` where ``answers`` maps
each ``Request.key`` to a string and ``report`` is a :class:`GenerationReport`. The LLM backends
(``openai``, ``hf``) write each answer to a durable cache (:mod:`llm_cache`) the moment it
arrives, so an interrupted run resumes by sending only the prompts still missing, and an identical
prompt is never sent twice.

Backends (``llm_backend``), one module each beside this one, which holds what they share
(settings, requests, the report, the cached-backend base and the answer gate):
  none     no LLM: each request's plain description is its knowledge text (the default, so that
           everything runs offline; the log says so). Here.
  openai   any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, ...): llm_openai.py.
  hf       a local transformers causal LM (a model folder or a GGUF file: local_llm.py), batched,
           on ``config["device"]``: llm_hf.py.
  replay   answers recorded earlier (a JSONL file); a prompt without a recording is an error:
           llm_replay.py.

For large jobs, ``batch_files.export_batch`` writes the missing prompts as an OpenAI Batch API /
``vllm run-batch`` input file and ``batch_files.import_batch`` loads its results into the cache;
the next ``generate`` then sends nothing.

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
  llm_processes      openai: processes that send (each with its share of llm_concurrency and of
                     the prompts): one Python process builds ~500 requests/s at most (the SDK
                     and httpx), less than a fast server (vLLM on a GPU) answers
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

import logging
import threading
import time
from dataclasses import dataclass, field, fields


from recbole_llmk.defaults import setting
from recbole_llmk.knowledge.answer_quality import VERDICTS, assess
from recbole_llmk.knowledge.llm_cache import LLMCache, request_hash

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
    processes: int
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
        for name in ("concurrency", "processes", "max_retries", "max_tokens", "batch_size", "bad_answer_retries",
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
        for name in ("concurrency", "processes", "batch_size", "max_tokens", "max_consecutive_failures"):
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
        from recbole_llmk.knowledge.llm_replay import ReplayBackend

        return ReplayBackend(settings)
    if settings.backend == "openai":
        from recbole_llmk.knowledge.llm_openai import OpenAIBackend

        return OpenAIBackend(settings, LLMCache(cache_dir))
    from recbole_llmk.knowledge.llm_hf import HFBackend

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
