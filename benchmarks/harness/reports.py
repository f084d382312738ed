"""The summary files (CSV, markdown) a suite's results folder holds."""

import os
import platform
import time


def write_reports(suite, rows, folder, wall_seconds, jobs, ran, finished, stale=None):
    import csv

    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "model", k))
    with open(os.path.join(folder, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    metrics = sorted({k[:-5] for r in rows for k in r if k.endswith("_mean")})
    header = ["model", "seeds"] + [m for m in metrics] + [f"{m} vs stock (p)" for m in metrics] + \
             ["epoch s", "train ms/batch", "infer ms/batch", "infer ms/batch prestored", "knowledge s",
              "prompts", "LLM calls", "LLM tokens", "epochs", "ran on"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, spec=".4f"):
        return "" if value is None else format(value, spec)

    for r in rows:
        cells = [r["model"], str(r["seeds"])]
        cells += [f"{r[m + '_mean']:.4f}" + (f" ± {r[m + '_std']:.4f}" if m + "_std" in r else "") for m in metrics]
        cells += [change(r, m, "") for m in metrics]
        cells += [fmt(r.get("train_epoch_seconds"), ".1f"), fmt(r.get("train_batch_ms"), ".1f"),
                  fmt(r.get("infer_batch_ms"), ".2f"), fmt(r.get("infer_batch_ms_prestored"), ".2f"),
                  fmt(r.get("knowledge_seconds"), ".0f"), fmt(r.get("llm_prompts"), ".0f"),
                  fmt(r.get("llm_calls"), ".0f"), fmt(r.get("llm_tokens"), ".0f"), fmt(r.get("epochs_run"), ".1f"),
                  r.get("ran_on", "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += versus_table(rows, metrics)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}"
    import torch

    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    note = (f"\nSuite `{suite['name']}` on {suite['dataset']}, produced by `python benchmarks/run_suite.py "
            f"{suite.get('path', '')}` on {time.strftime('%Y-%m-%d')} ({machine}); "
            + (f"{n_cells(ran)} ran {wall_seconds / 60:.1f} min in this invocation" if ran else
               "no cell ran in this invocation: the table is rebuilt from cells run earlier")
            + f"{f' ({jobs} at a time, so the times are of cells sharing the machine)' if jobs > 1 else ''}"
            + load_note(finished) + reuse_note(finished) + stale_note(stale) + ". Test-split metrics, mean ± std over seeds; "
            "p: paired t-test against the stock backbone on the same seeds, with the 95 % confidence interval "
            "of the paired difference (relative to the other row's mean); times are left out of a row "
            "whose cells ran on both CPU and GPU"
            + ("; ‡: the test pairs CPU with GPU cells" if any("‡" in (r.get("mixed", "") + r.get("versus_mixed", ""))
                                                             for r in rows) else "")
            + ("; †: the test pairs cells of different commits (each cell's provenance names its own)"
               if any("†" in (r.get("mixed", "") + r.get("versus_mixed", "")) for r in rows) else "")
            + ("; users' 95% CI: the same difference's interval over the test users (each user's difference "
               "averaged over the shared seeds; from users/), where both rows' cells recorded their users"
               if any(k.endswith("_users_ci") for r in rows for k in r) else "")
            + ("; the second table compares a variant with the entry it names, the same way" if any(r.get("versus") for r in rows) else "")
            + ".\n")
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n" + note)
    return "\n".join(lines) + "\n" + note


def versus_table(rows, metrics):
    """Markdown lines comparing each entry with its ``versus`` entry (none when no entry names one)."""
    pairs = [r for r in rows if r.get("versus")]
    if not pairs:
        return []
    lines = ["", "| model | against | " + " | ".join(f"{m} (p)" for m in metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for r in pairs:
        changes = [change(r, m, "_versus") for m in metrics]
        lines.append(f"| {r['model']} | {r['versus']} | " + " | ".join(changes) + " |")
    return lines


def change(row, metric, against):
    """Relative change with its paired-test p, or why there is no test (:func:`untested`), and its
    interval over the test users where the cells recorded them; marked when its pairs mix devices
    or code versions (:func:`mixed_pairs`)."""
    if f"{metric}{against}_rel" not in row:
        return ""
    p, interval = row[f"{metric}{against}_p"], row.get(f"{metric}{against}_ci")
    marks = row.get(f"{against.lstrip('_')}_mixed" if against else "mixed") or ""
    ci = f", 95% CI {100 * interval[0]:+.2f} to {100 * interval[1]:+.2f}%" if interval else ""
    users = row.get(f"{metric}{against}_users_ci")
    over_users = f"; users' 95% CI {100 * users[0]:+.2f} to {100 * users[1]:+.2f}%" if users else ""
    tested = (f"({row[f'{metric}{against}_untested']}: no test{over_users})" if p is None
              else f"(p={p:.3f}{ci}{over_users})")
    return (f"{100 * row[f'{metric}{against}_rel']:+.2f}% " + tested
            + (f" {marks}" if marks else ""))


def n_cells(n):
    """"1 cell", "2 cells": the notes count cells."""
    return f"{n} cell" if n == 1 else f"{n} cells"


def reuse_note(cells):
    """Which cells are another suite's runs (``reuse_cells_from``), so a reader knows whose they are."""
    reused = sorted({os.path.dirname(os.path.dirname(c["same_run_as"])) for c in cells if c.get("same_run_as")})
    count = sum(1 for c in cells if c.get("same_run_as"))
    return f"; copied from {', '.join(reused)}'s runs of the same settings: {n_cells(count)} (see same_run_as)" if count else ""


def stale_note(stale):
    """The finished cells left out because the suite asks another run of them now."""
    if not stale:
        return ""
    return (f"; left out: {n_cells(len(stale))} run under settings the suite has changed since ("
            + ", ".join(f"{cell}: {', '.join(keys)}" for cell, keys in sorted(stale.items())) + "; rerun them)")


def load_note(cells):
    """The 1-minute load average at the end of the cells that recorded it, against the cores."""
    loads = [c["load_average_1min"] for c in cells if c.get("load_average_1min") is not None]
    if not loads:
        return ""
    return (f"; load average at the end of {len(loads)} of {len(cells)} cells: {min(loads):.1f}-{max(loads):.1f} "
            f"on {os.cpu_count()} cores (above the cores: the cells shared the CPU with other work)")
