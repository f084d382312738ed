"""Batch files: the prompts not yet answered as an OpenAI Batch / ``vllm run-batch`` input file, and
such a job's results back into the answer cache (``--run=export_batch`` / ``import_batch``).

``batch_shards: N`` splits the export into N files (``<name>-00000-of-0000N.jsonl`` ...) for N batch
workers (or a service's per-file limit); ``import_batch`` takes a file, or a glob of result files
(``--batch_file='results-*.jsonl'``), in any order and any number of them: an answer is filed under
its prompt's hash, so shards may come back in any order, twice, or some not yet.
"""

import glob
import json
import logging
import os

from recbole_llmk.files import written_whole

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


def shard_paths(path, shards):
    """The files an export of ``shards`` parts writes: ``path`` itself for one."""
    if int(shards) < 1:
        raise ValueError(f"batch_shards must be at least 1, got {shards}")
    if int(shards) == 1:
        return [path]
    stem, extension = os.path.splitext(path)
    return [f"{stem}-{i:05d}-of-{int(shards):05d}{extension}" for i in range(int(shards))]


def export_batch(config, cache_dir, requests, path, shards=1):
    """Write the requests not yet cached as OpenAI Batch API / ``vllm run-batch`` input files:
    ``path``, or ``shards`` files of nearly equal size (:func:`shard_paths`).

    Each distinct prompt is one line; its ``custom_id`` is the cache hash, which is how
    :func:`import_batch` files the answer. -> the number of lines written."""
    settings, cache, jobs = _batch_jobs(config, cache_dir, requests)
    todo = [job for job in jobs.values() if job.hash not in cache]
    paths = shard_paths(path, shards)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for number, shard in enumerate(paths):
        part = todo[number * len(todo) // len(paths):(number + 1) * len(todo) // len(paths)]
        with written_whole(shard) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for job in part:
                body = {"model": settings.model, "messages": job.messages, "max_tokens": settings.max_tokens,
                        "temperature": settings.temperature}
                line = {"custom_id": job.hash, "method": "POST", "url": BATCH_URL, "body": body}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    where = path if len(paths) == 1 else f"{len(paths)} files {paths[0]} ... {paths[-1]}"
    logging.getLogger().info(
        f"wrote {len(todo)} batch requests to {where} ({len(jobs) - len(todo)} already cached); run them with "
        f"the OpenAI Batch API or `vllm run-batch -i <file> -o <results file> --model ...`, then import_batch "
        f"(one results file, or a glob of them)")
    return len(todo)


def import_batch(config, cache_dir, requests, results_path):
    """Store batch results' successful answers in the cache, filed under their hash:
    ``results_path`` is a file or a glob of files (shards, in any order).

    -> counts ``{"imported", "already_cached", "failed", "unknown"}``. ``unknown``: lines whose
    custom_id matches none of ``requests`` (another job's results, or different settings)."""
    paths = sorted(glob.glob(results_path)) if glob.has_magic(results_path) else [results_path]
    if not paths:
        raise FileNotFoundError(f"batch_file '{results_path}' matches no file")
    settings, cache, jobs = _batch_jobs(config, cache_dir, requests)
    counts = {"imported": 0, "already_cached": 0, "failed": 0, "unknown": 0}
    errors = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                outcome, error = _import_line(line, jobs, cache, settings.model)
                counts[outcome] += 1
                if error:
                    errors.append(f"{os.path.basename(path)} line {number}: {error}")
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
