"""RecBole 1.2.1's own model tests, run through the plugin with each model renamed to its variants.

    python benchmarks/recbole_model_tests.py                       # every test x technique, resumable
    python benchmarks/recbole_model_tests.py --only ReLand --tests BPR,SASRec --timeout 900

RecBole runs ``tests/model/test_model_auto.py`` (137 tests: each a ``config_dict`` for one model,
on its tiny ``tests/test_data/test`` dataset with ``test_model.yaml``) through
``objective_function``. This script reads those dicts from ``../shared/data/recbole-tests`` (it
skips, saying so, when the folder is absent; nothing is copied into the project) and runs each as
``<Model>_REKI``, ``<Model>_ReLand`` and ``<Model>_LEARN`` with ``run_recbole_llmk``, one process per
run (a crash or a hang costs that run only). A variant the plugin refuses by name is recorded as
refused without a run. Knowledge: ``llm_backend: none`` (plain descriptions), the packaged MiniLM
encoder, and two shortened stages so a run costs seconds (``reland_behaviour_epochs: 2``,
``learn_features_epochs: 1``); RecBole's own settings are the test's.

Each run is appended to ``<results>/recbole_model_tests/runs.jsonl`` as it ends (a rerun skips
finished ones; ``--again`` reruns them) and ``summary.md`` counts passed, refused by name, refused
before any knowledge, refused on purpose of the test's own settings (LEARN of a random split: the
message names the setting), and failed, with each reason's first line and each technique's wall
time. Not part of the test suite (hours on a CPU).
"""

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from recbole_llmk.files import written_whole  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data", "recbole-tests", "tests")
TECHNIQUES = ("REKI", "ReLand", "LEARN")
YAML = os.path.join(SHARED, "model", "test_model.yaml")
SHORTENED = {"llm_backend": "none", "reland_behaviour_epochs": 2, "learn_features_epochs": 1, "show_progress": False}

RUN = r"""
import json, sys, traceback
from recbole_llmk.quick_start import run_recbole_llmk
spec = json.loads(sys.argv[1])
try:
    result = run_recbole_llmk(spec["model"], "test", config_file_list=[spec["yaml"]], config_dict=spec["config"], saved=False)
    print("RESULT " + json.dumps({"status": "passed", "test_result": {k: float(v) for k, v in result["test_result"].items()}}))
except Exception as error:
    refused = isinstance(error, ValueError) and "is not supported" in str(error)
    first = (str(error).splitlines() or [""])[0][:300]
    print("RESULT " + json.dumps({"status": "refused" if refused else "failed", "error": f"{type(error).__name__}: {first}",
                                  "trace": traceback.format_exc()[-1500:]}))
"""


def recbole_tests(path):
    """``[(test name, config_dict)]`` from RecBole's ``test_model_auto.py``, in file order."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    tests = []
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        for fn in (node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "config_dict":
                    tests.append((f"{cls.name}.{fn.name}", ast.literal_eval(node.value)))
                    break
    return tests


def run_config(config, variant, work):
    """A RecBole test's ``config_dict`` run as ``variant`` on RecBole's test data, shortened, writing
    under ``work``."""
    return dict(config, **SHORTENED, model=variant, data_path=os.path.join(SHARED, "test_data"), checkpoint_dir=work,
                knowledge_dir=os.path.join(work, "knowledge"))


def run_one(variant, config, yaml_file, timeout):
    spec = {"model": variant, "yaml": yaml_file, "config": config}
    start = time.time()
    try:
        done = subprocess.run([sys.executable, "-c", RUN, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, cwd=config["checkpoint_dir"])
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout} s", "seconds": round(time.time() - start, 1)}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    record = json.loads(lines[-1][7:]) if lines else {
        "status": "failed", "error": f"the process ended with code {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    record["seconds"] = round(time.time() - start, 1)
    return record


def reason_of(record):
    """A record's error without its model's name, so that one reason groups many models."""
    model = record["variant"].rpartition("_")[0]
    return record.get("error", "").replace(record["variant"], "<variant>").replace(model, "<model>")[:160]


RANDOM_SPLIT = "refused: the test's random split"


def status_of(record):
    """LEARN refuses a RecBole test's random split on purpose (documented; its message names the
    split to use): counted apart from failures."""
    if record["status"] == "failed" and "(a sequential model) needs a time-ordered one" in record.get("error", ""):
        return RANDOM_SPLIT
    return record["status"]


def summary(records):
    records = [dict(r, status=status_of(r)) for r in records]
    lines = ["| technique | passed | refused by name | refused before any knowledge | refused: the test's random split "
             "(LEARN needs a time-ordered one; documented) | failed | wall s, all runs | median s a run |",
             "|---|---|---|---|---|---|---|---|"]
    for technique in TECHNIQUES:
        mine = [r for r in records if r["technique"] == technique]
        counts = Counter(r["status"] for r in mine)
        seconds = [r["seconds"] for r in mine if "seconds" in r]
        lines.append(f"| {technique} | {counts['passed']} | {counts['refused by name']} | {counts['refused']} | "
                     f"{counts[RANDOM_SPLIT]} | {counts['failed']} | "
                     f"{sum(seconds):.0f} | {statistics.median(seconds) if seconds else 0:.1f} |")
    reasons = Counter((r["technique"], r["status"], reason_of(r)) for r in records if r["status"] != "passed")
    lines += ["", "| technique | status | runs | reason |", "|---|---|---|---|"]
    for (technique, status, reason), n in sorted(reasons.items(), key=lambda item: (item[0][0], -item[1])):
        lines.append(f"| {technique} | {status} | {n} | {reason.replace('|', '/')} |")
    lines += ["", "Passed: " + ", ".join(sorted({r["variant"] for r in records if r["status"] == "passed"})) + "."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", help="comma-separated techniques (default: all)")
    parser.add_argument("--tests", help="comma-separated model names (default: every test)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    parser.add_argument("--again", action="store_true", help="rerun finished runs")
    args = parser.parse_args()
    source = os.path.join(SHARED, "model", "test_model_auto.py")
    if not os.path.isfile(source):
        print(f"skipped: RecBole's model tests are not at {os.path.normpath(source)} (../shared/data/recbole-tests)")
        return
    from recbole_llmk.utils import get_model

    folder = os.path.join(args.results, "recbole_model_tests")
    work = os.path.join(folder, "work")
    os.makedirs(work, exist_ok=True)
    runs_file = os.path.join(folder, "runs.jsonl")
    done = {}
    if os.path.isfile(runs_file):
        with open(runs_file, encoding="utf-8") as f:
            done = {(r["test"], r["variant"]): r for r in map(json.loads, f)}
    techniques = args.only.split(",") if args.only else TECHNIQUES
    models = set(args.tests.split(",")) if args.tests else None
    for test, config in recbole_tests(source):
        if models and config["model"] not in models:
            continue
        for technique in techniques:
            variant = f"{config['model']}_{technique}"
            if (test, variant) in done and not args.again:
                continue
            record = {"test": test, "variant": variant, "technique": technique}
            try:
                get_model(variant)
            except ValueError as error:
                record.update(status="refused by name", error=str(error).splitlines()[0][:300])
            else:
                record.update(run_one(variant, run_config(config, variant, work), YAML, args.timeout))
            print(f"{test} {variant}: {record['status']}" + (f" ({record['error']})" if "error" in record else "")
                  + (f" {record['seconds']} s" if "seconds" in record else ""), flush=True)
            with open(runs_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            done[(test, variant)] = record
    with written_whole(os.path.join(folder, "summary.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(summary(list(done.values())) + "\n")
    print(summary(list(done.values())))


if __name__ == "__main__":
    main()
