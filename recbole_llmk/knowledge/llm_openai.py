"""The ``openai`` backend: any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama), with
concurrency, retries, a breaker for dead endpoints and the answer cache (``generation`` documents
the settings).
"""

import json
import logging
import os
import queue
import random
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import replace
from urllib.parse import parse_qsl, urlsplit

from tqdm import tqdm

from recbole_llmk.knowledge.answer_quality import assess
from recbole_llmk.knowledge.deadline import http_client
from recbole_llmk.knowledge.generation import (ABORT_STATUSES, MAX_BACKOFF, GenerationError, GenerationReport, _CachedBackend,
                                               _Tally)
from recbole_llmk.knowledge.llm_cache import LLMCache
from recbole_llmk.logs import public_url, redact, url_secrets

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
        processes = min(self.settings.processes, self._limit.limit, len(jobs))
        if processes > 1:
            return self._run_in_processes(jobs, tally, processes)
        with tqdm(total=len(jobs), desc=f"LLM {self.model_id}", unit="prompt") as bar:
            return self._send(client, jobs, tally, bar.update)

    def _send(self, client, jobs, tally, done):
        """Send ``jobs`` from this process's threads (``done(1)`` as each ends); -> {hash: error}."""
        self._breaker = _Breaker(self.settings.max_consecutive_failures)
        stop = threading.Event()
        failures = {}
        pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="llm")
        try:
            futures = {pool.submit(self._answer, client, job, tally, stop): job for job in jobs}
            for future in as_completed(futures):
                error = future.result()
                if error is not None:
                    failures[futures[future].hash] = error
                done(1)
        except _AbortRun as exc:
            stop.set()
            raise GenerationError(str(exc), report=tally.report) from None
        except BaseException:
            stop.set()  # Ctrl-C: stop sending; answers already received are cached
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return failures

    def _run_in_processes(self, jobs, tally, processes):
        """``llm_processes`` sending processes, each with its share of the jobs and of the in-flight
        limit, past what one Python process's request building can send (the openai SDK and httpx
        cost ~2 ms of CPU a request). Each caches its answers as they arrive, in the cache every
        process shares (claims keep a prompt from being paid twice); this one gathers their counts
        and failures and then reads their answers from the cache."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
        share = replace(self.settings, processes=1, concurrency=-(-self._limit.limit // processes))
        messages = context.Queue()
        workers = [context.Process(target=send_shard, daemon=True, name=f"llm-sender-{i}",
                                   args=(share, self.cache.path, jobs[i::processes], messages))
                   for i in range(processes)]
        for worker in workers:
            worker.start()
        failures, errors, results, senders = {}, [], 0, []
        try:
            with tqdm(total=len(jobs), desc=f"LLM {self.model_id} ({processes} processes)", unit="prompt") as bar:
                while results < processes:
                    try:
                        message = messages.get(timeout=1.0)
                    except queue.Empty:
                        dead = [w for w in workers if w.exitcode not in (None, 0)]
                        if dead:
                            raise GenerationError(f"LLM sending process {dead[0].name} died (exit code "
                                                  f"{dead[0].exitcode}); the answers it received are cached: rerun "
                                                  "to send only the prompts still missing", report=tally.report)
                        continue
                    if message[0] == "done":
                        bar.update(message[1])
                        continue
                    _, shard_failures, counts, error, sender = message
                    senders.append(sender)
                    results += 1
                    failures.update(shard_failures)
                    tally.add(**counts)
                    if error:
                        errors.append(error)
        finally:
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():  # e.g. Ctrl-C here: the senders stop too (their answers are cached)
                    worker.terminate()
        self.cache.refresh()  # the senders' answers
        logging.getLogger().info("LLM prompts sent by " + ", ".join(f"process {pid}: {n}" for pid, n in senders))
        if errors:
            raise GenerationError(errors[0], report=tally.report)
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


SHARD_COUNTS = ("cached", "called", "retries", "prompt_tokens", "completion_tokens")


def send_shard(settings, cache_path, jobs, messages):
    """One sending process of ``OpenAIBackend._run_in_processes``: sends ``jobs`` through its own
    client and threads, caching each answer; reports ``("done", n)`` as jobs end, then
    ``("result", failures, counts, error, (pid, jobs sent))``."""
    backend = OpenAIBackend(settings, LLMCache(*os.path.split(cache_path)))
    backend._limit = _InFlightLimit(settings.concurrency)  # the server was checked by the parent
    report = GenerationReport(backend=backend.name)
    tally = _Tally(report)
    failures, error = {}, None
    try:
        failures = backend._send(backend._client(), jobs, tally, lambda n: messages.put(("done", n)))
    except GenerationError as exc:
        error = str(exc)
    counts = {name: getattr(report, name) for name in SHARD_COUNTS}
    messages.put(("result", failures, counts, error, (os.getpid(), len(jobs))))
