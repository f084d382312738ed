"""Validation and test scores at every evaluation of a suite's cells: does the validation split
rank a variant against its stock as the test split does?

    python benchmarks/valid_test_curves.py benchmarks/suites/reland_fusion_ml100k.yaml --only BPR-patient,ReLand-patient [--seeds 2020,2021]
    python benchmarks/valid_test_curves.py benchmarks/suites/reland_fusion_ml100k.yaml --report-only
    python benchmarks/valid_test_curves.py benchmarks/suites/reland_fusion_ml100k.yaml --cells   # from the finished cells alone

A cell picks its epoch by the validation split (RecBole's early stop) and reports the test split
there. Each (label, seed) here runs as the suite's cell does (the same settings, its own process,
the suite's results folder) and also scores the test split after every validation. Full-sort
evaluation, and sampled evaluation with fixed negatives, draw no random numbers that training
uses, so the run and its final result are the cell's: where the suite has the finished cell, the
curve records whether its test result matches it digit for digit, and where it does and the cell
recorded no test users (a cell run before they were), writes them for it (``users/``). Writes
``<results>/<suite>/curves/<label>-<seed>.json`` (the validation metric and every test metric at
each evaluated epoch, with the cell's provenance) and prints, per label over its seeds: the
validation metric at the chosen epoch, the test metric there (the cell's result), their ratio,
the test metric at the last evaluation and the best over all evaluations (an oracle no cell may
use: what the choice by validation leaves) and, for a top-k metric, the test change against the
row's stock with its 95 % interval over the test users (the suite's paired t-test varies only
the training seed on one split of the data). Not part of the test suite.
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
from harness.schema import cell_config, cell_file, entries, finished_cells, load_suite, read_cell, selected_cells  # noqa: E402
from harness.statistics import users_interval  # noqa: E402
from harness.users import evaluated_per_user, users_file, write_users  # noqa: E402
from recbole_llmk.files import written_whole  # noqa: E402


def record_test(curve):
    """``run_cell``'s validation callback: the test split's scores at each validated epoch (and
    the name of the validation metric, as the trainer reads it); for a top-k validation metric,
    each test user's value of it at the epoch the early stop keeps so far (RecBole's rule: an
    equal or better validation score)."""
    def on_validation(trainer, test_data, epoch, valid_score):
        test, users = evaluated_per_user(trainer, test_data)
        curve["valid_metric"], curve["bigger_is_better"] = trainer.valid_metric, trainer.valid_metric_bigger
        curve["points"].append({"epoch": epoch, "valid_score": float(valid_score),
                                "test": {k: float(v) for k, v in test.items()}})
        if valid_score == trainer.best_valid_score:  # fit has just kept this epoch
            curve["per_user_test"] = (users or {}).get(trainer.valid_metric)
    return on_validation


def run_curve(suite, label, seed, output):
    """One cell with its test curve, in this process (inside the suite's results folder)."""
    entry = {e["label"]: e for e in entries(suite)}[label]
    curve = {"valid_metric": None, "bigger_is_better": True, "points": [], "per_user_test": None}
    cell = run_cell(entry["model"], suite["dataset"], cell_config(suite, entry, seed), label,
                    on_validation=record_test(curve))
    folder = os.path.dirname(os.path.dirname(output))
    suite_cell, recorded = cell_file(folder, label, seed), read_cell(folder, label, seed)
    matches = None if recorded is None else recorded["test"] == cell["test"]
    users = cell.get("per_user_test")
    if matches and users and not os.path.isfile(users_file(suite_cell)):
        # the suite's cell, run again to the same result: its test users, for one run before they were recorded
        write_users(users_file(suite_cell), users)
    result = {"label": label, "seed": seed, "valid_metric": curve["valid_metric"],
              "bigger_is_better": curve["bigger_is_better"], "curve": curve["points"], "test": cell["test"],
              "valid": cell["valid"], "epochs_run": cell["epochs_run"],
              "matches_suite_cell": matches, "per_user_test": curve["per_user_test"],
              "provenance": cell["provenance"]}
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


NEIGHBOURS = 10  # evaluations on each side of the kept one that :func:`above_neighbours` compares it with


def above_neighbours(run, score):
    """How far the kept evaluation's ``score(point)`` stands above the mean of the ``NEIGHBOURS``
    evaluations on each side of it, relative. On validation the early stop picked that epoch for
    being high, so it is high partly by the split's noise; on test it is not picked, so a test
    value near 0 says the validation's margin was that noise (a larger one for a run whose scores
    jump more between epochs)."""
    points = run["curve"]
    kept = points.index(chosen(run))
    around = points[max(kept - NEIGHBOURS, 0):kept] + points[kept + 1:kept + 1 + NEIGHBOURS]
    return score(points[kept]) / statistics.mean(score(p) for p in around) - 1


def mean_step(run):
    """The validation metric's mean change from one evaluation to the next over the run's last two
    thirds (past the first climb), relative to its mean there: how much it jitters."""
    scores = [p["valid_score"] for p in run["curve"]][len(run["curve"]) // 3:]
    steps = [abs(b - a) for a, b in zip(scores, scores[1:])]
    return statistics.mean(steps) / statistics.mean(scores) if steps else 0.0


def summary_row(runs):
    """Means over seeds of one label's curves (the validation metric names the test metric)."""
    metric = runs[0]["valid_metric"]
    pick = [chosen(r) for r in runs]
    mean = statistics.mean
    return {"seeds": len(runs), "epochs": mean([r["epochs_run"] for r in runs]),
            "valid at chosen": mean([p["valid_score"] for p in pick]),
            "test at chosen": mean([p["test"][metric] for p in pick]),
            "test / valid": mean([p["test"][metric] / p["valid_score"] for p in pick]),
            "test at last": mean([r["curve"][-1]["test"][metric] for r in runs]),
            "best test (oracle)": mean([best_test(r, metric) for r in runs]),
            "valid step": f"{100 * mean([mean_step(r) for r in runs]):.1f} %",
            f"chosen over its ±{NEIGHBOURS}: valid": percent(mean([above_neighbours(r, valid_of) for r in runs])),
            f"chosen over its ±{NEIGHBOURS}: test": percent(mean([above_neighbours(r, test_of(metric)) for r in runs])),
            "same as cell": sum(bool(r["matches_suite_cell"]) for r in runs)}


def valid_of(point):
    return point["valid_score"]


def test_of(metric):
    return lambda point: point["test"][metric]


def percent(fraction):
    return f"{100 * fraction:+.1f} %"


def against_stock(runs, stock_runs):
    """The test metric's 95 % interval over the test users against the stock row (each user's
    difference averaged over the seeds both ran; ``harness.statistics.users_interval``), relative
    to stock's mean: (low, high), or None. The suite's paired t-test varies only the training seed
    on one split; this interval is what the sample of test users alone leaves uncertain."""
    metric = runs[0]["valid_metric"]
    ours = {r["seed"]: r for r in runs if r["per_user_test"]}
    theirs = {r["seed"]: r for r in stock_runs or [] if r["per_user_test"]}

    def users_of(run):  # one evaluator order for both rows: a user's place is the user
        return {"user": list(range(len(run["per_user_test"]))), metric: run["per_user_test"]}

    shared = set(ours) & set(theirs)
    return users_interval({s: ours[s] for s in shared}, {s: theirs[s] for s in shared}, metric, users_of)


def cells_report(folder):
    """From the suite's finished cells (no curve needed): each label's validation metric at its
    kept epoch, its test metric and their ratio, means over seeds."""
    by_label = {}
    for cell in finished_cells(folder):
        shared = [m for m in cell["valid"] if m in cell["test"]]
        if shared:
            by_label.setdefault(cell["model"], []).append((cell["valid"], cell["test"]))
    lines = ["| label | seeds | metric | valid | test | test / valid |", "|---|---|---|---|---|---|"]
    for label, runs in by_label.items():
        metric = next((m for m in ("ndcg@10", "auc") if m in runs[0][0]), next(iter(runs[0][0])))
        valid = statistics.mean(v[metric] for v, _ in runs)
        test = statistics.mean(t[metric] for _, t in runs)
        lines.append(f"| {label} | {len(runs)} | {metric} | {valid:.4f} | {test:.4f} | {test / valid:.3f} |")
    return "\n".join(lines) + "\n"


def report(suite, folder):
    """A markdown table of every label with curves in ``folder``; also written to ``summary.md``."""
    by_label = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                run = json.load(f)
            by_label.setdefault(run["label"], []).append(run)
    if not by_label:
        raise SystemExit(f"no curves in {folder} yet")
    stock_of_label = {e["label"]: e["stock"] for e in entries(suite)}
    rows = {}
    for label, runs in by_label.items():
        rows[label] = summary_row(runs)
        interval = against_stock(runs, by_label.get(stock_of_label.get(label)))
        rows[label]["test vs stock, users' 95 % CI"] = (
            f"{50 * (interval[0] + interval[1]):+.1f} % ± {50 * (interval[1] - interval[0]):.1f}" if interval else "")
    columns = list(next(iter(rows.values())))
    metric = next(iter(by_label.values()))[0]["valid_metric"]
    lines = [f"{metric}, means over seeds; chosen = the epoch the early stop keeps (best validation score)", "",
             "| label | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in rows.items():
        cells = [v if isinstance(v, str) else f"{v:g}" if isinstance(v, int) else f"{v:.4f}" if v < 10 else f"{v:.1f}"
                 for v in row.values()]
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
    parser.add_argument("--cells", action="store_true",
                        help="print validation against test from the suite's finished cells, run nothing")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: label,seed,output
    args = parser.parse_args()
    suite = load_suite(os.path.abspath(args.suite))
    if args.cell:
        label, seed, output = args.cell.split(",", 2)
        sys.argv = sys.argv[:1]  # RecBole's Config reads argv
        run_curve(suite, label, int(seed), output)
        return
    folder = os.path.join(args.results, suite["name"])
    if args.cells:
        print(cells_report(folder))
        return
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
    print(report(suite, curves))


if __name__ == "__main__":
    main()
