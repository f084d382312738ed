"""Validation and test scores at every evaluation of a suite's cells: does the validation split
rank a variant against its stock as the test split does?

    python benchmarks/valid_test_curves.py benchmarks/suites/reland_fusion_ml100k.yaml --only BPR-patient,ReLand-patient [--seeds 2020,2021]
    python benchmarks/valid_test_curves.py benchmarks/suites/reland_fusion_ml100k.yaml --report-only

A cell picks its epoch by the validation split (RecBole's early stop) and reports the test split
there. Each (label, seed) here runs as the suite's cell does (the same settings, its own process,
the suite's results folder) and also scores the test split after every validation. Full-sort
evaluation, and sampled evaluation with fixed negatives, draw no random numbers that training
uses, so the run and its final result are the cell's: where the suite has the finished cell, the
curve records whether its test result matches it digit for digit. Writes
``<results>/<suite>/curves/<label>-<seed>.json`` (the validation metric and every test metric at
each evaluated epoch, with the cell's provenance) and prints, per label over its seeds: the
validation metric at the chosen epoch, the test metric there (the cell's result), their ratio,
the test metric at the last evaluation and the best over all evaluations (an oracle no cell may
use: what the choice by validation leaves). Not part of the test suite.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from harness.cells import run_cell  # noqa: E402
from harness.schema import cell_config, cell_file, entries, load_suite, selected_cells  # noqa: E402
from recbole_llmk.files import written_whole  # noqa: E402


def record_test(curve):
    """``run_cell``'s validation callback: the test split's scores at each validated epoch (and
    the name of the validation metric, as the trainer reads it)."""
    def on_validation(trainer, test_data, epoch, valid_score):
        test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        curve["valid_metric"], curve["bigger_is_better"] = trainer.valid_metric, trainer.valid_metric_bigger
        curve["points"].append({"epoch": epoch, "valid_score": float(valid_score),
                                "test": {k: float(v) for k, v in test.items()}})
    return on_validation


def run_curve(suite, label, seed, output):
    """One cell with its test curve, in this process (inside the suite's results folder)."""
    entry = {e["label"]: e for e in entries(suite)}[label]
    curve = {"valid_metric": None, "bigger_is_better": True, "points": []}
    cell = run_cell(entry["model"], suite["dataset"], cell_config(suite, entry, seed), label,
                    on_validation=record_test(curve))
    suite_cell = cell_file(os.path.dirname(os.path.dirname(output)), label, seed)
    matches = None
    if os.path.isfile(suite_cell):
        with open(suite_cell) as f:
            matches = json.load(f)["test"] == cell["test"]
    result = {"label": label, "seed": seed, "valid_metric": curve["valid_metric"],
              "bigger_is_better": curve["bigger_is_better"], "curve": curve["points"], "test": cell["test"], "valid": cell["valid"], "epochs_run": cell["epochs_run"],
              "matches_suite_cell": matches, "provenance": cell["provenance"]}
    with written_whole(output) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2)


def chosen(run):
    """The evaluation RecBole's early stop keeps: the best validation score, the last of equals
    (``recbole.utils.early_stopping`` moves on to an equal score)."""
    sign = 1 if run["bigger_is_better"] else -1
    best = max(sign * point["valid_score"] for point in run["curve"])
    return [point for point in run["curve"] if sign * point["valid_score"] == best][-1]


def best_test(run, metric):
    """The test metric's best over all evaluations (higher or lower is better as for validation)."""
    values = [point["test"][metric] for point in run["curve"]]
    return max(values) if run["bigger_is_better"] else min(values)


def summary_row(runs):
    """Means over seeds of one label's curves (the validation metric names the test metric)."""
    metric = runs[0]["valid_metric"]
    pick = [chosen(r) for r in runs]

    def mean(values):
        return statistics.mean(values)

    return {"seeds": len(runs), "epochs": mean([r["epochs_run"] for r in runs]),
            "valid at chosen": mean([p["valid_score"] for p in pick]),
            "test at chosen": mean([p["test"][metric] for p in pick]),
            "test / valid": mean([p["test"][metric] / p["valid_score"] for p in pick]),
            "test at last": mean([r["curve"][-1]["test"][metric] for r in runs]),
            "best test (oracle)": mean([best_test(r, metric) for r in runs]),
            "same as cell": sum(bool(r["matches_suite_cell"]) for r in runs)}


def report(folder):
    """A markdown table of every label with curves in ``folder``; also written to ``summary.md``."""
    by_label = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                run = json.load(f)
            by_label.setdefault(run["label"], []).append(run)
    if not by_label:
        raise SystemExit(f"no curves in {folder} yet")
    rows = {label: summary_row(runs) for label, runs in by_label.items()}
    columns = list(next(iter(rows.values())))
    metric = next(iter(by_label.values()))[0]["valid_metric"]
    lines = [f"{metric}, means over seeds; chosen = the epoch the early stop keeps (best validation score)", "",
             "| label | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in rows.items():
        cells = [f"{v:.4f}" if isinstance(v, float) and v < 10 else f"{v:g}" for v in row.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with written_whole(os.path.join(folder, "summary.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", default=None, help="comma-separated labels (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the suite's)")
    parser.add_argument("--report-only", action="store_true", help="print the table of the curves already run")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: label,seed,output
    args = parser.parse_args()
    suite = load_suite(os.path.abspath(args.suite))
    if args.cell:
        label, seed, output = args.cell.split(",", 2)
        sys.argv = sys.argv[:1]  # RecBole's Config reads argv
        run_curve(suite, label, int(seed), output)
        return
    folder = os.path.join(args.results, suite["name"])
    curves = os.path.join(folder, "curves")
    os.makedirs(curves, exist_ok=True)
    for label, seed in ([] if args.report_only else selected_cells(suite, args.only, args.seeds)):
        output = cell_file(folder, label, seed, "curves")
        if os.path.isfile(output):
            print(f"{label} seed {seed}: done earlier, skipped", flush=True)
            continue
        print(f"{label} seed {seed} ...", flush=True)
        with open(cell_file(folder, label, seed, "curves", ".out"), "w") as log:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), os.path.abspath(args.suite),
                                   f"--cell={label},{seed},{output}"], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"{label} seed {seed} failed: see {log.name}")
        os.remove(log.name)
    print(report(curves))


if __name__ == "__main__":
    main()
