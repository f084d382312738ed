"""What an LLM answer cache holds, per prompt kind: how many answers, how the answer gate judged
them, how many hit llm_max_tokens, and a few answers verbatim, as markdown.

    python benchmarks/answer_samples.py benchmarks/results/reki_smollm2_ml100k/llm_cache/llm_cache.jsonl [--samples 3] [--prompt-chars 200]

A prompt's kind is its request key's prefix (``item:242`` -> item; REKI-C: item-cluster,
positive-cluster, negative-cluster). Each prompt counts once, with its last answer (the one the
store uses); ``asked again`` counts prompts whose first answer the gate sent back. The samples are
the first answers by key order, so the same file gives the same samples.
"""

import argparse
import json
import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_llmk.knowledge.answer_quality import VERDICTS, assess  # noqa: E402


def last_answers(path):
    """{hash: the last record} of a cache file (what the backends read)."""
    records = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            records[record["hash"]] = record
    return records


def kind_of(record):
    return record["key"].split(":", 1)[0]


def summary(records, samples, prompt_chars=None):
    by_kind = defaultdict(list)
    for record in records.values():
        by_kind[kind_of(record)].append(record)
    lines = ["| prompt kind | answers | flagged now | " + " | ".join(VERDICTS) + " | asked again | hit max tokens |",
             "|---|---|---|" + "---|" * len(VERDICTS) + "---|---|"]
    examples = []
    for kind in sorted(by_kind):
        rows = sorted(by_kind[kind], key=lambda r: r["key"])
        verdicts = Counter(assess(r["response"], r["prompt"]) for r in rows)
        flagged = sum(count for verdict, count in verdicts.items() if verdict)
        retried = sum(1 for r in rows if (r.get("attempt") or 1) > 1)
        cut = sum(1 for r in rows if r.get("finish_reason") == "length")
        lines.append(f"| {kind} | {len(rows)} | {flagged} ({100 * flagged / len(rows):.1f} %) | "
                     + " | ".join(str(verdicts.get(v, 0)) for v in VERDICTS) + f" | {retried} | {cut} |")
        for r in rows[:samples]:
            prompt = r["prompt"] if prompt_chars is None or len(r["prompt"]) <= prompt_chars else \
                r["prompt"][:prompt_chars] + f" [... {len(r['prompt']) - prompt_chars} more characters]"
            examples.append(f"**{r['key']}** (verdict: {assess(r['response'], r['prompt']) or 'none'}, "
                            f"finish: {r.get('finish_reason')}, attempt {r.get('attempt') or 1})\n\n"
                            f"Prompt:\n```\n{prompt}\n```\nAnswer (verbatim):\n```\n{r['response']}\n```\n")
    return "\n".join(lines) + "\n\n" + "\n".join(examples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--prompt-chars", type=int, default=None, help="cut longer prompts (answers stay whole)")
    args = parser.parse_args()
    print(summary(last_answers(args.cache), args.samples, args.prompt_chars))


if __name__ == "__main__":
    main()
