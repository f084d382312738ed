"""Batch files: the prompts not yet answered as an OpenAI Batch / ``vllm run-batch`` input file, and
such a job's results back into the answer cache (``--run=export_batch`` / ``import_batch``).
"""

import json
import logging
import os

from recbole_llmk.knowledge.answer_quality import assess
from recbole_llmk.knowledge.generation import BATCH_URL, GenerationError, LLMSettings, _Job
from recbole_llmk.knowledge.llm_cache import LLMCache
from recbole_llmk.knowledge.llm_replay import completion_content

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
    content = completion_content(response)
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
