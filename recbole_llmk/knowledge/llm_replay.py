"""The ``replay`` backend: recorded prompt/response pairs (JSONL); a prompt without a recording is
an error.
"""

import json
import logging
import os
import time

from recbole_llmk.knowledge.answer_quality import assess
from recbole_llmk.knowledge.generation import GenerationError, GenerationReport, gate_answers

def completion_content(response):
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
        response = completion_content(response)
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
