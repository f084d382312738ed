"""REKI with a real LLM client: the openai package against the test server, end to end."""

import json

import pytest

from llm_server import LLMTestServer, answer_for, completion_body
from recbole_llmk.knowledge.store import KnowledgeStore
from recbole_llmk.quick_start import run_recbole_llmk


@pytest.fixture
def server():
    with LLMTestServer() as running:
        yield running


def llm_config(tiny_config, server):
    return dict(tiny_config, llm_backend="openai", llm_model="test-model", llm_base_url=server.base_url,
                llm_max_tokens=64, llm_backoff=0.01, llm_concurrency=4)


def test_openai_knowledge_trains_and_is_never_paid_twice(tiny_config, server):
    config = llm_config(tiny_config, server)
    server.add_faults("429", "500")  # survived by retries
    first = run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=config)
    store = KnowledgeStore.open(first["knowledge_store"])
    n_prompts = 30 + 40  # users + items of the tiny dataset
    assert store.meta["generation"]["called"] == n_prompts + 2 and store.meta["generation"]["retries"] == 2
    assert store.meta["llm_backend"] == "openai" and store.meta["llm_model"] == "test-model"
    assert all(text.startswith("ANSWER[") for text in store.texts("user").values())  # the LLM's words, encoded
    assert set(first["test_result"]) == {"auc", "logloss"}

    # A new store for another model on the same split: every answer comes from the cache.
    answered = server.answered_total
    run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=dict(config, knowledge_rebuild=True))
    assert server.answered_total == answered


def test_batch_export_import_through_the_entry_point(tiny_config, server, workdir):
    config = llm_config(tiny_config, server)
    batch = workdir / "prompts.jsonl"
    assert run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=dict(config, batch_file=str(batch)),
                            run="export_batch") == {"exported": 70}
    results = workdir / "results.jsonl"
    with results.open("w") as f:  # what the batch service returns
        for number, line in enumerate(map(json.loads, batch.read_text().splitlines())):
            prompt = line["body"]["messages"][-1]["content"]
            body = completion_body(line["body"]["model"], answer_for(prompt), prompt, number)
            f.write(json.dumps({"custom_id": line["custom_id"], "response": {"status_code": 200, "body": body}}) + "\n")
    counts = run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=dict(config, batch_file=str(results)), run="import_batch")
    assert counts["imported"] == 70
    built = run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=config, run="knowledge")
    assert server.answered_total == 0  # the batch paid for everything
    assert KnowledgeStore.open(built["knowledge_store"]).meta["generation"]["cached"] == 70
