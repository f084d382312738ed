"""Generation backends against a real local HTTP server: answers, cache, retries, crash safety.

No real LLM service is called: ``tests/llm_server.py`` plays the OpenAI-compatible endpoint and
injects the faults, and a tiny random-weight GPT-2 plays the local ``hf`` model.
"""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from recbole_llmk.knowledge.batch_files import export_batch, import_batch
from recbole_llmk.knowledge.generation import GenerationError, Request, make_backend
from recbole_llmk.knowledge.llm_cache import CACHE_FILE, LLMCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_server import REFUSAL, LLMTestServer, answer_for, completion_body  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "RECBOLE_LLMK_TEST_KEY"
SECRET = "sk-test-VERY-SECRET-0123456789"


def make_requests(count, kind="user"):
    return [Request(f"{kind}:{i}", f"Summarise the tastes of {kind} {i}, who liked Title{i} Story and more.",
                    f"{kind} {i} description") for i in range(count)]


def openai_config(server, **overrides):
    config = {"llm_backend": "openai", "llm_model": "test-model", "llm_base_url": server.base_url,
              "llm_api_key_env": KEY_ENV, "llm_backoff": 0.001, "llm_timeout": 5, "llm_max_retries": 3,
              "llm_concurrency": 4, "llm_max_tokens": 64}
    config.update(overrides)
    return config


def cache_lines(cache_dir):
    path = Path(cache_dir) / CACHE_FILE
    return path.read_bytes().splitlines() if path.exists() else []


def cache_records(cache_dir):
    return [json.loads(line) for line in cache_lines(cache_dir)]


@pytest.fixture
def server():
    with LLMTestServer(slow_seconds=2.0) as running:
        yield running


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    """The local server needs no key (the backend then sends "EMPTY"); tests that want one set it."""
    monkeypatch.delenv(KEY_ENV, raising=False)


# --- openai backend -----------------------------------------------------------------------------


def test_openai_answers_are_cached_and_identical_prompts_sent_once(server, tmp_path):
    requests = make_requests(10)
    twins = [Request("item:twin-a", requests[0].prompt, "a"), Request("item:twin-b", requests[1].prompt, "b")]
    config = openai_config(server)

    answers, report = make_backend(config, str(tmp_path)).generate(requests + twins)

    assert answers == {**{r.key: answer_for(r.prompt) for r in requests},
                       "item:twin-a": answer_for(requests[0].prompt), "item:twin-b": answer_for(requests[1].prompt)}
    assert (report.requested, report.cached, report.called, report.failed) == (12, 0, 10, 0)
    assert report.prompt_tokens > 0 and report.completion_tokens > 0
    assert server.received == 10 and set(server.answered.values()) == {1}

    again, report = make_backend(config, str(tmp_path)).generate(requests + twins)
    assert again == answers
    assert (report.cached, report.called) == (12, 0)
    assert server.received == 10
    assert "cached" in report.summary()


def test_changing_the_system_prompt_asks_again(server, tmp_path):
    requests = make_requests(3)
    make_backend(openai_config(server), str(tmp_path)).generate(requests)
    _, report = make_backend(openai_config(server, llm_system_prompt="Be brief."), str(tmp_path)).generate(requests)
    assert report.called == 3


@pytest.mark.parametrize("fault", ["429", "500", "503", "slow", "drip", "malformed", "empty", "no_choices"])
def test_transient_faults_are_retried(server, tmp_path, fault):
    server.add_faults(fault, fault)
    requests = make_requests(6)
    # The slow fault answers after 2 s, well past this timeout; the drip fault sends a byte every
    # 0.3 s (each read is quick, the whole answer takes a minute).
    start = time.time()
    answers, report = make_backend(openai_config(server, llm_timeout=0.5), str(tmp_path)).generate(requests)
    assert time.time() - start < 5
    assert answers == {r.key: answer_for(r.prompt) for r in requests}
    assert report.retries == 2 and report.failed == 0
    assert report.called == 6 + 2
    assert server.faults_applied == [fault, fault]
    assert len(cache_lines(tmp_path)) == 6


def test_a_prompt_failing_past_the_retry_budget_fails_the_run_but_the_rest_is_cached(server, tmp_path):
    requests = make_requests(6) + [Request("item:poison", "POISON prompt", "x")]
    server.fail_prompts_containing("POISON", "500")
    config = openai_config(server, llm_max_retries=2)

    with pytest.raises(GenerationError, match=r"1 of 7 requests got no answer.*item:poison.*only the 1 missing") as info:
        make_backend(config, str(tmp_path)).generate(requests)
    assert info.value.report.failed == 1 and info.value.report.retries == 2
    assert server.faults_applied == ["500"] * 3  # first try + 2 retries
    assert len(cache_lines(tmp_path)) == 6

    server.clear_faults()
    answers, report = make_backend(config, str(tmp_path)).generate(requests)
    assert (report.cached, report.called) == (6, 1)
    assert answers["item:poison"] == answer_for("POISON prompt")


def test_a_bad_request_is_not_retried(server, tmp_path):
    server.fail_prompts_containing("BAD", "400")
    requests = make_requests(3) + [Request("item:bad", "BAD prompt", "x")]
    with pytest.raises(GenerationError, match="HTTP 400") as info:
        make_backend(openai_config(server), str(tmp_path)).generate(requests)
    assert info.value.report.retries == 0 and server.faults_applied == ["400"]
    # What a too-long prompt needs: which request, how long, what to change.
    assert "item:bad" in str(info.value) and "the prompt has 10 characters" in str(info.value)
    assert "history_length" in str(info.value)


# --- what real servers do -------------------------------------------------------------------------


def test_a_serial_server_queue_lowers_concurrency_instead_of_failing(tmp_path, caplog):
    """A server that answers one request at a time (llama-cpp-python's) with 8 sent at once: the
    last ones time out in its queue. The client halves what it sends until they fit, without
    using up the prompts' retries, and the work the server did for nobody stays bounded."""
    requests = make_requests(10)
    with LLMTestServer(serial_seconds=0.2) as server:
        config = openai_config(server, llm_concurrency=8, llm_timeout=1.0, llm_max_retries=1)
        answers, report = make_backend(config, str(tmp_path)).generate(requests)
        worked = server.worked
    assert answers == {r.key: answer_for(r.prompt) for r in requests} and report.failed == 0
    assert "the server queues them" in caplog.text and "llm_concurrency=" in caplog.text
    assert report.retries >= 1 and report.called == len(requests) + report.retries
    # what the server did for nobody: at most the in-flight requests of each halving (8, 4, 2, 1), not a storm
    assert worked <= len(requests) + 8 + 4 + 2 + 1


def test_a_server_that_says_its_slots_gets_no_more_at_once(tmp_path):
    requests = make_requests(8)
    with LLMTestServer(total_slots=2, serial_seconds=0.02) as server:
        make_backend(openai_config(server, llm_concurrency=8), str(tmp_path)).generate(requests)
        assert server.max_in_flight == 2 and server.answered_total == 8


def test_a_server_that_lists_other_models_is_refused_before_any_prompt(tmp_path):
    """llama.cpp answers to any model name with the model it loaded: the cache would file its
    answers under the name asked for. The listed names are the check."""
    with LLMTestServer(models=["/models/SmolLM2-135M-Instruct.Q4_1.gguf"]) as server:
        with pytest.raises(GenerationError, match="serves /models/SmolLM2-135M-Instruct.Q4_1.gguf, not llm_model=gpt-4o"):
            make_backend(openai_config(server, llm_model="gpt-4o"), str(tmp_path)).generate(make_requests(2))
        assert server.received == 0
        config = openai_config(server, llm_model="/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        answers, _ = make_backend(config, str(tmp_path)).generate(make_requests(2))
        assert len(answers) == 2 and server.received == 2


def test_an_answer_cut_at_max_tokens_is_recorded_and_counted(server, tmp_path):
    server.add_faults("length")
    _, report = make_backend(openai_config(server), str(tmp_path)).generate(make_requests(3))
    assert report.truncated == 1 and report.failed == 0
    reasons = [record.get("finish_reason") for record in cache_records(tmp_path)]
    assert sorted(reasons) == ["length", "stop", "stop"]
    assert all(record["served_model"] == "test-model" for record in cache_records(tmp_path))


def test_a_dead_endpoint_fails_in_seconds_with_what_to_check(tmp_path, caplog):
    """Nothing listens at llm_base_url: the run stops after llm_max_consecutive_failures calls,
    not after every prompt's retries with backoff (2,607 prompts took hours)."""
    from llama_server import free_port

    base_url = f"http://127.0.0.1:{free_port()}/v1"
    config = {"llm_backend": "openai", "llm_model": "m", "llm_base_url": base_url, "llm_backoff": 0.05,
              "llm_concurrency": 4}
    start = time.time()
    with pytest.raises(GenerationError, match="got no answer for 10 calls in a row") as info:
        make_backend(config, str(tmp_path)).generate(make_requests(200))
    # the breaker's 10 calls, plus at most one prompt's attempts (1 + llm_max_retries 5) per worker
    # in flight when it tripped (23 seen on a loaded machine); not 200 prompts' retries
    assert time.time() - start < 10 and info.value.report.called < 10 + 4 * 6
    assert f"curl http://127.0.0.1:{base_url.split(':')[2]}" in str(info.value) and "connection error" in str(info.value)


def test_a_web_server_that_is_no_llm_fails_fast(server, tmp_path):
    server.fail_prompts_containing("user", "malformed")  # every answer is not JSON
    with pytest.raises(GenerationError, match="got no answer for 5 calls in a row"):
        make_backend(openai_config(server, llm_max_consecutive_failures=5), str(tmp_path)).generate(make_requests(50))
    # the breaker's 5, plus at most one prompt's attempts (1 + llm_max_retries 3) per worker (4) in
    # flight when it tripped; not 50 prompts' retries (under 10 on a quiet machine)
    assert server.received < 5 + 4 * 4


def test_rate_limits_never_trip_the_breaker(server, tmp_path):
    server.add_faults(*["429"] * 12)
    answers, report = make_backend(openai_config(server, llm_max_consecutive_failures=3, llm_max_retries=8),
                                   str(tmp_path)).generate(make_requests(3))
    assert len(answers) == 3 and report.retries == 12


# --- the answer gate ------------------------------------------------------------------------------


def test_a_refusal_is_asked_again_at_a_sampling_temperature(server, tmp_path):
    server.add_faults("refusal")
    requests = make_requests(3)
    answers, report = make_backend(openai_config(server), str(tmp_path)).generate(requests)
    assert answers == {r.key: answer_for(r.prompt) for r in requests}
    assert report.bad_answer_retries == 1 and report.flagged == {} and report.called == 4
    assert server.temperatures == [0.0, 0.0, 0.0, 0.7]
    refused = [record for record in cache_records(tmp_path) if record["response"] == REFUSAL]
    assert len(refused) == 1 and refused[0]["verdict"] == "refusal"  # kept in the file, superseded
    retried = [record for record in cache_records(tmp_path) if record.get("attempt") == 2]
    assert len(retried) == 1 and retried[0]["temperature"] == 0.7 and "verdict" not in retried[0]


def test_a_model_that_always_refuses_is_asked_a_bounded_number_of_times(server, tmp_path, caplog):
    server.fail_prompts_containing("user 1,", "refusal")
    config = openai_config(server, llm_bad_answer_retries=2)
    answers, report = make_backend(config, str(tmp_path)).generate(make_requests(3))
    assert answers["user:1"] == REFUSAL and report.flagged == {"refusal": 1}
    assert report.bad_answer_retries == 2 and server.received == 3 + 2
    assert "1 of 3 LLM answers are not usable knowledge (1 refusal" in caplog.text and "user:1 (refusal)" in caplog.text
    # A rerun has nothing left to ask: the retries are spent and recorded.
    _, report = make_backend(config, str(tmp_path)).generate(make_requests(3))
    assert server.received == 5 and report.cached == 3 and report.flagged == {"refusal": 1}


def test_bad_answer_policies_keep_and_fail(server, tmp_path, caplog):
    server.add_faults("refusal")
    requests = make_requests(3)
    with pytest.raises(GenerationError, match="llm_on_bad_answer=fail") as info:
        make_backend(openai_config(server, llm_on_bad_answer="fail"), str(tmp_path)).generate(requests)
    assert info.value.report.flagged == {"refusal": 1} and len(cache_lines(tmp_path)) == 3  # nothing lost
    answers, report = make_backend(openai_config(server, llm_on_bad_answer="keep"), str(tmp_path)).generate(requests)
    assert server.received == 3 and report.cached == 3  # keep: nothing asked again
    assert list(answers.values()).count(REFUSAL) == 1 and report.flagged == {"refusal": 1}
    assert "kept as knowledge (llm_on_bad_answer=keep" in caplog.text


def test_a_refusal_cached_before_the_gate_existed_is_asked_again(server, tmp_path):
    """Refusals used to be cached and stored silently and forever: the next run repairs them."""
    requests = make_requests(2)
    settings = make_backend(openai_config(server), str(tmp_path)).settings
    hash_ = settings.hash("openai", "test-model", settings.messages(requests[0].prompt))
    LLMCache(str(tmp_path)).put(hash_, "user:0", "test-model", requests[0].prompt, REFUSAL)  # an old record
    answers, report = make_backend(openai_config(server), str(tmp_path)).generate(requests)
    assert answers["user:0"] == answer_for(requests[0].prompt) and report.bad_answer_retries == 1
    assert sorted(server.temperatures) == [0.0, 0.7] and report.cached == 0 and report.flagged == {}


def test_replayed_refusals_are_counted_and_fail_stops(tmp_path, caplog):
    recording = tmp_path / "answers.jsonl"
    requests = make_requests(2)
    recording.write_text("".join(json.dumps({"prompt": r.prompt, "response": answer}) + "\n"
                                 for r, answer in zip(requests, [REFUSAL, "A fine answer."])))
    config = {"llm_backend": "replay", "llm_replay_file": str(recording)}
    _, report = make_backend(config, str(tmp_path)).generate(requests)
    assert report.flagged == {"refusal": 1} and "recorded answers cannot be asked again" in caplog.text
    with pytest.raises(GenerationError, match="1 of 2 LLM answers are not usable"):
        make_backend(dict(config, llm_on_bad_answer="fail"), str(tmp_path)).generate(requests)


def test_gate_settings_are_checked(tmp_path):
    with pytest.raises(GenerationError, match="llm_on_bad_answer='maybe' is unknown"):
        make_backend({"llm_backend": "replay", "llm_on_bad_answer": "maybe"}, str(tmp_path))
    with pytest.raises(GenerationError, match="llm_repetition_penalty=1.2 is for llm_backend=hf"):
        make_backend({"llm_backend": "openai", "llm_model": "m", "llm_repetition_penalty": 1.2}, str(tmp_path))


def test_auth_error_aborts_the_run_without_leaking_the_key(server, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.fail_prompts_containing("", "401")  # the server echoes the key it got in its error
    requests = make_requests(30)

    with pytest.raises(GenerationError) as info:
        make_backend(openai_config(server, llm_concurrency=2), str(tmp_path)).generate(requests)
    message = str(info.value)
    assert "401" in message and KEY_ENV in message and f"127.0.0.1:{server.port}" in message
    assert SECRET not in message
    assert SECRET not in caplog.text
    assert server.received <= 4  # stopped right away, not once per prompt
    assert all(SECRET.encode() not in line for line in cache_lines(tmp_path))


def test_missing_key_for_a_remote_endpoint_names_the_variable(tmp_path):
    config = {"llm_backend": "openai", "llm_model": "gpt-3.5-turbo", "llm_base_url": "https://llm.example.invalid/v1",
              "llm_api_key_env": KEY_ENV}
    with pytest.raises(GenerationError, match=f"set the environment variable {KEY_ENV}"):
        make_backend(config, str(tmp_path)).generate(make_requests(1))


def test_endpoint_credentials_never_appear_in_messages(tmp_path):
    config = {"llm_backend": "openai", "llm_model": "m", "llm_api_key_env": KEY_ENV,
              "llm_base_url": "https://user:hunter2@llm.example.invalid/v1?api-key=hunter3"}
    backend = make_backend(config, str(tmp_path))
    assert backend.endpoint == "https://llm.example.invalid/v1"
    with pytest.raises(GenerationError) as info:
        backend.generate(make_requests(1))
    assert "hunter" not in str(info.value)


def test_bad_settings_are_explained(tmp_path):
    with pytest.raises(GenerationError, match="llm_backend='gpt' is unknown"):
        make_backend({"llm_backend": "gpt"}, str(tmp_path))
    with pytest.raises(GenerationError, match="needs llm_model"):
        make_backend({"llm_backend": "openai"}, str(tmp_path))


# --- crash safety -------------------------------------------------------------------------------

CLIENT = """
import json, sys
from recbole_llmk.knowledge.generation import Request, make_backend
job = json.load(open(sys.argv[1]))
make_backend(job["config"], job["cache_dir"]).generate([Request(**r) for r in job["requests"]])
"""


def wait_until(condition, client, timeout, log):
    deadline = time.time() + timeout
    while not condition():
        if client.poll() is not None:
            pytest.fail(f"the client exited early ({client.returncode}): {Path(log).read_text()[-2000:]}")
        if time.time() > deadline:
            client.kill()
            pytest.fail("timed out waiting for the client")
        time.sleep(0.02)


def test_kill_9_then_resume_sends_no_prompt_twice(tmp_path):
    answered_before_kill, total = 7, 20
    requests = make_requests(total)
    cache_dir = tmp_path / "cache"
    with LLMTestServer(hang_after=answered_before_kill) as server:
        config = openai_config(server, llm_concurrency=2, llm_timeout=30)
        job = tmp_path / "job.json"
        job.write_text(json.dumps({"config": config, "cache_dir": str(cache_dir),
                                   "requests": [asdict(r) for r in requests]}))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        log = tmp_path / "client.log"
        with open(log, "w") as err:
            client = subprocess.Popen([sys.executable, "-c", CLIENT, str(job)], cwd=tmp_path, env=env,
                                      stdout=err, stderr=err)
        try:
            wait_until(lambda: server.answered_total >= answered_before_kill
                       and len(cache_lines(cache_dir)) >= answered_before_kill, client, 30, log)
        finally:
            os.kill(client.pid, signal.SIGKILL)
            client.wait()
        assert server.answered_total == answered_before_kill  # the rest hang: the kill is mid-run

        server.clear_hang()
        answers, report = make_backend(config, str(cache_dir)).generate(requests)

        assert answers == {r.key: answer_for(r.prompt) for r in requests}
        assert (report.cached, report.called) == (answered_before_kill, total - answered_before_kill)
        assert [server.answered[r.prompt] for r in requests] == [1] * total


TWIN = """
import json, sys
sys.path.insert(0, {tests!r})
from test_generation import make_requests
from recbole_llmk.knowledge.generation import make_backend
config = json.loads(sys.argv[1])
answers, report = make_backend(config, sys.argv[2]).generate(make_requests(24))
print(json.dumps({{"answers": len(answers), "called": report.called, "cached": report.cached}}))
"""


def test_two_processes_sharing_a_cache_never_pay_twice(tmp_path):
    """Two runs on one knowledge_dir (e.g. two store settings of a grid) started together ask the
    same 24 prompts: each prompt is sent once; the other process waits for it and reads it."""
    with LLMTestServer(serial_seconds=0.03) as server:
        config = json.dumps(openai_config(server, llm_concurrency=4))
        script = TWIN.format(tests=str(Path(__file__).resolve().parent))
        runs = [subprocess.Popen([sys.executable, "-c", script, config, str(tmp_path)], stdout=subprocess.PIPE,
                                 text=True, cwd=REPO) for _ in range(2)]
        results = [json.loads(run.communicate(timeout=120)[0].strip().splitlines()[-1]) for run in runs]
        assert server.received == 24 and server.answered_total == 24
    assert [r["answers"] for r in results] == [24, 24]
    assert sum(r["called"] for r in results) == 24 and sum(r["cached"] for r in results) == 24
    assert len(cache_lines(tmp_path)) == 24


def test_a_truncated_last_cache_line_is_skipped_and_appends_stay_readable(tmp_path, caplog):
    cache = LLMCache(str(tmp_path))
    cache.put("h1", "user:1", "m", "p1", "r1")
    cache.put("h2", "user:2", "m", "p2", "r2")
    with open(cache.path, "ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"hash": "h3", "key": "user:3", "model": "m", "prompt": "p3", "resp')

    with caplog.at_level(logging.WARNING):
        reopened = LLMCache(str(tmp_path))
    assert len(reopened) == 2 and "truncated last line" in caplog.text
    reopened.put("h4", "user:4", "m", "p4", "r4")

    final = LLMCache(str(tmp_path))
    assert [final.get(h) for h in ("h1", "h2", "h3", "h4")] == ["r1", "r2", None, "r4"]
    assert json.loads(cache_lines(tmp_path)[-1])["response"] == "r4"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device every write to fails as a full disk)")
def test_a_cache_on_a_full_disk_names_its_file_and_what_to_do(tmp_path):
    cache = LLMCache(str(tmp_path))
    os.symlink("/dev/full", cache.path)  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(OSError) as info:
        cache.put("h1", "user:1", "m", "p1", "r1")
    assert info.value.errno == errno.ENOSPC
    assert cache.path in str(info.value) and "only the prompts still missing are sent" in str(info.value)
    assert cache.get("h1") is None  # not counted as cached


def test_a_cache_holds_places_and_reads_records_back_whoever_appended_them(tmp_path):
    """In memory a cache keeps where each answer is in the file, not the answer: records written
    by this process, by another one (read on refresh), and after a cut line all read back whole."""
    ours, theirs = LLMCache(str(tmp_path)), LLMCache(str(tmp_path))
    ours.put("h1", "user:1", "m", "p1 " * 50, "r1", finish_reason="stop")
    theirs.put("h2", "user:2", "m", "p2", "r2 ü")  # appended after h1, unknown to ours
    with open(ours.path, "ab") as f:
        f.write(b'{"hash": "h3", "resp')  # a kill mid-write
    ours.put("h4", "user:4", "m", "p4", "r4")  # written after the cut line, on a fresh line
    assert "h2" not in ours
    ours.refresh()
    assert [ours.get(h) for h in ("h1", "h2", "h3", "h4")] == ["r1", "r2 ü", None, "r4"]
    assert ours.record("h1")["prompt"] == "p1 " * 50 and ours.record("h1")["finish_reason"] == "stop"
    assert all(isinstance(place, tuple) for place in ours._places.values())
    theirs.refresh()
    assert theirs.get("h4") == "r4" and theirs.get("h1") == "r1"


def test_a_prompt_whose_record_was_cut_is_asked_again(server, tmp_path):
    requests = make_requests(5)
    config = openai_config(server)
    make_backend(config, str(tmp_path)).generate(requests)
    path = tmp_path / CACHE_FILE
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 40])  # the last record loses its end and its newline

    answers, report = make_backend(config, str(tmp_path)).generate(requests)
    assert (report.cached, report.called) == (4, 1)
    assert answers == {r.key: answer_for(r.prompt) for r in requests}
    assert len(LLMCache(str(tmp_path))) == 5


def test_the_server_runs_as_a_separate_process(tmp_path):
    import openai

    port_file = tmp_path / "port"
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "llm_server.py"), "--port-file", str(port_file),
                                "--hang-after", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 20
        while not port_file.exists() and time.time() < deadline:
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port_file.read_text()}/v1", api_key="EMPTY",
                               timeout=30, max_retries=0)  # a busy CI machine may answer slowly
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == answer_for("hi")
        with pytest.raises(openai.APITimeoutError):  # the second request hangs
            client.with_options(timeout=0.5).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=10)
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"received": 2, "answered": 1}


# --- replay -------------------------------------------------------------------------------------


def test_replay_reads_every_recorded_shape(tmp_path, caplog):
    recording = tmp_path / "recorded.jsonl"
    lines = [
        {"prompt": "prompt one", "response": "answer one"},
        {"prompt": "prompt two", "completion": "answer two"},
        {"prompt": "prompt three", "response": {"choices": [{"message": {"role": "assistant", "content": "answer three"}}]}},
        {"messages": [{"role": "user", "content": "prompt four"}], "response": "answer four"},
    ]
    recording.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    requests = [Request(f"user:{i}", f"  prompt {word}\n", "d") for i, word in enumerate(["one", "two", "three", "four"])]
    config = {"llm_backend": "replay", "llm_replay_file": str(recording)}

    with caplog.at_level(logging.WARNING):
        answers, report = make_backend(config, str(tmp_path / "cache")).generate(requests)
    assert answers == {"user:0": "answer one", "user:1": "answer two", "user:2": "answer three", "user:3": "answer four"}
    assert (report.cached, report.called) == (4, 0)
    assert "skipped 1 lines" in caplog.text


def test_replay_of_a_cache_file(server, tmp_path):
    requests = make_requests(4)
    expected, _ = make_backend(openai_config(server), str(tmp_path)).generate(requests)
    config = {"llm_backend": "replay", "llm_replay_file": str(tmp_path / CACHE_FILE)}
    answers, report = make_backend(config, str(tmp_path)).generate(requests)
    assert answers == expected and report.called == 0


def test_replay_miss_says_what_is_missing(tmp_path):
    recording = tmp_path / "recorded.jsonl"
    recording.write_text(json.dumps({"prompt": "known", "response": "yes"}) + "\n")
    requests = [Request("item:1", "known", "d"), Request("item:2", "unknown prompt text", "d"),
                Request("item:3", "also unknown", "d")]
    backend = make_backend({"llm_backend": "replay", "llm_replay_file": str(recording)}, str(tmp_path))
    with pytest.raises(GenerationError, match=r"2 of 3 prompts.*recorded.jsonl.*item:2.*unknown prompt text"):
        backend.generate(requests)
    with pytest.raises(GenerationError, match="llm_replay_file to name a recorded JSONL file; it is not set"):
        make_backend({"llm_backend": "replay"}, str(tmp_path))
    with pytest.raises(GenerationError, match=r"it names '.*answrs.jsonl', which does not exist"):
        make_backend({"llm_backend": "replay", "llm_replay_file": str(tmp_path / "answrs.jsonl")}, str(tmp_path))


# --- batch export / import ----------------------------------------------------------------------


def test_batch_export_then_import_then_generate_sends_only_what_failed(server, tmp_path):
    requests = make_requests(5) + [Request("item:twin", make_requests(1)[0].prompt, "d")]
    config = openai_config(server)
    batch = tmp_path / "batch" / "input.jsonl"

    assert export_batch(config, str(tmp_path / "cache"), requests, str(batch)) == 5
    lines = [json.loads(line) for line in batch.read_text().splitlines()]
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    assert lines[0]["body"] == {"model": "test-model", "messages": [{"role": "user", "content": requests[0].prompt}],
                                "max_tokens": 64, "temperature": 0.0}

    # What a batch service returns: 4 answers, 1 error, and a line of some other job.
    results = []
    for number, line in enumerate(lines):
        prompt = line["body"]["messages"][-1]["content"]
        body = completion_body(line["body"]["model"], answer_for(prompt), prompt, number)
        ok = {"custom_id": line["custom_id"], "response": {"status_code": 200, "request_id": "r", "body": body},
              "error": None}
        failed = {"custom_id": line["custom_id"], "response": None,
                  "error": {"code": "server_error", "message": "try later"}}
        results.append(failed if number == 4 else ok)
    results.append(dict(results[0], custom_id="not-ours"))
    results_path = tmp_path / "batch" / "output.jsonl"
    results_path.write_text("\n".join(json.dumps(r) for r in results) + "\n")

    counts = import_batch(config, str(tmp_path / "cache"), requests, str(results_path))
    assert counts == {"imported": 4, "already_cached": 0, "failed": 1, "unknown": 1}

    answers, report = make_backend(config, str(tmp_path / "cache")).generate(requests)
    assert answers == {r.key: answer_for(r.prompt) for r in requests}
    assert (report.cached, report.called) == (5, 1)  # only the prompt whose batch line failed
    assert export_batch(config, str(tmp_path / "cache"), requests, str(batch)) == 0


def batch_results(input_path):
    """What a batch worker returns for an input file: every prompt answered."""
    lines = [json.loads(line) for line in input_path.read_text().splitlines()]
    return [{"custom_id": line["custom_id"], "error": None,
             "response": {"status_code": 200, "request_id": "r", "body": completion_body(
                 line["body"]["model"], answer_for(line["body"]["messages"][-1]["content"]),
                 line["body"]["messages"][-1]["content"], number)}} for number, line in enumerate(lines)]


def test_batch_shards_go_to_several_workers_and_come_back_in_any_order(server, tmp_path):
    requests = make_requests(11)
    config, cache = openai_config(server), str(tmp_path / "cache")
    batch = tmp_path / "batch" / "input.jsonl"
    assert export_batch(config, cache, requests, str(batch), shards=4) == 11
    shards = sorted((tmp_path / "batch").glob("input-*-of-00004.jsonl"))
    sizes = [len(path.read_text().splitlines()) for path in shards]
    assert len(shards) == 4 and sorted(sizes) == [2, 3, 3, 3] and not batch.exists()
    ids = [json.loads(line)["custom_id"] for path in shards for line in path.read_text().splitlines()]
    assert len(set(ids)) == 11  # each prompt in exactly one shard

    # three workers finish, in reverse order, one of them twice; the fourth is still running
    for number, path in enumerate(reversed(shards[1:])):
        out = tmp_path / "batch" / f"results-{number}.jsonl"
        out.write_text("\n".join(json.dumps(r) for r in batch_results(path)) + "\n")
    (tmp_path / "batch" / "results-again.jsonl").write_text((tmp_path / "batch" / "results-0.jsonl").read_text())
    counts = import_batch(config, cache, requests, str(tmp_path / "batch" / "results-*.jsonl"))
    assert counts["imported"] == 11 - sizes[0] and counts["already_cached"] == sizes[3] and counts["failed"] == 0
    assert export_batch(config, cache, requests, str(batch), shards=4) == sizes[0]  # only the missing shard's
    with pytest.raises(FileNotFoundError, match="matches no file"):
        import_batch(config, cache, requests, str(tmp_path / "batch" / "nothing-*.jsonl"))


# --- none and hf --------------------------------------------------------------------------------


def test_none_backend_returns_descriptions(tmp_path, caplog):
    requests = make_requests(3)
    with caplog.at_level(logging.WARNING):
        answers, report = make_backend({}, str(tmp_path)).generate(requests)
    assert answers == {r.key: r.description for r in requests}
    assert (report.requested, report.called, report.cached) == (3, 0, 0)
    assert "no LLM is used" in caplog.text


def write_tiny_causal_lm(path, chat_template=None):
    """A 1-layer random-weight GPT-2 with a word-level tokenizer, saved like a real model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "<eos>"] + sorted(set(" ".join(r.prompt for r in make_requests(8)).split())) + \
        [f"w{i}" for i in range(50)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<eos>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                        bos_token_id=1, eos_token_id=1)
    model = GPT2LMHeadModel(config)
    model.generation_config.suppress_tokens = [0, 1]  # random weights favour [UNK]; make it say words
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("template", [None, "{% for m in messages %}{{ m['content'] }} {% endfor %}"])
def test_hf_backend_generates_in_batches_and_caches(tmp_path, template):
    model = write_tiny_causal_lm(str(tmp_path / "model"), template)
    requests = make_requests(5)
    config = {"llm_backend": "hf", "llm_model": model, "llm_max_tokens": 5, "llm_batch_size": 2, "device": "cpu"}

    answers, report = make_backend(config, str(tmp_path / "cache")).generate(requests)
    assert set(answers) == {r.key for r in requests}
    assert all(isinstance(a, str) and 1 <= len(a.split()) <= 5 for a in answers.values())  # new tokens only
    assert (report.called, report.completion_tokens) == (5, 25) and report.prompt_tokens > 0
    # Its end of turn is suppressed, so every answer runs to llm_max_tokens.
    assert report.truncated == 5 and {r["finish_reason"] for r in cache_records(tmp_path / "cache")} == {"length"}

    again, report = make_backend(config, str(tmp_path / "cache")).generate(requests)
    assert again == answers and (report.cached, report.called) == (5, 0)

    fresh, _ = make_backend(config, str(tmp_path / "other-cache")).generate(requests)
    assert fresh == answers  # greedy decoding at temperature 0, whatever the batch padding


def test_several_sending_processes_send_every_prompt_once_and_count_it(server, tmp_path, caplog):
    requests = make_requests(40) + [Request("item:twin", make_requests(1)[0].prompt, "twin")]
    caplog.set_level(logging.INFO)
    answers, report = make_backend(openai_config(server, llm_processes=2), str(tmp_path)).generate(requests)
    assert answers == {r.key: answer_for(r.prompt) for r in requests}
    assert (report.requested, report.cached, report.called, report.failed) == (41, 0, 40, 0)
    assert report.prompt_tokens > 0 and server.received == 40 and set(server.answered.values()) == {1}
    senders = [line for line in caplog.messages if line.startswith("LLM prompts sent by")]
    pids = {int(pid) for pid in __import__("re").findall(r"process (\d+): 20", senders[0])}
    assert len(pids) == 2 and os.getpid() not in pids
    assert len(LLMCache(str(tmp_path))) == 40
    again, report = make_backend(openai_config(server, llm_processes=2), str(tmp_path)).generate(requests)
    assert again == answers and (report.cached, report.called, server.received) == (41, 0, 40)


def test_a_failing_prompt_in_one_sending_process_fails_the_run_and_the_rest_is_cached(server, tmp_path):
    requests = make_requests(12) + [Request("item:poison", "POISON prompt", "p")]
    server.fail_prompts_containing("POISON", "400")
    with pytest.raises(GenerationError, match="1 of 13 requests got no answer") as info:
        make_backend(openai_config(server, llm_processes=3), str(tmp_path)).generate(requests)
    assert info.value.report.failed == 1 and len(LLMCache(str(tmp_path))) == 12


def test_a_dead_endpoint_stops_every_sending_process_in_seconds(tmp_path):
    from llama_server import free_port

    config = {"llm_backend": "openai", "llm_model": "m", "llm_base_url": f"http://127.0.0.1:{free_port()}/v1",
              "llm_backoff": 0.05, "llm_concurrency": 4, "llm_processes": 2}
    start = time.time()
    with pytest.raises(GenerationError, match="got no answer for 10 calls in a row"):
        make_backend(config, str(tmp_path)).generate(make_requests(200))
    assert time.time() - start < 30  # two spawned interpreters start, each trips its own breaker
