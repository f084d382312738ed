"""Whether a finished cell is still the run its suite asks for, and cells other suites ran that stand for ours."""

import json
import os
from functools import lru_cache

import yaml

from harness import ROOT
from harness.schema import cell_file, cell_settings, entries, is_stock, load_suite, old_values
from harness.users import USER, read_users, users_file, write_users
from recbole_llmk.files import written_whole


# settings that change which numbers a run reports, not the run itself
REPORT_ONLY = ("metrics", "topk")


# settings that say where a run keeps its files (stores are found by content), not what it computes
WHERE_ONLY = ("checkpoint_dir", "knowledge_dir", "llm_cache_dir")


def listed(config, key):
    """A setting RecBole takes as one value or a list (``topk: 10``), as a lower-case set; None
    when unset."""
    value = config.get(key)
    return None if value is None else {str(v).lower() for v in (value if isinstance(value, list) else [value])}


def reports_at_most(ours, theirs):
    """Whether a run under ``theirs`` reported every metric a run under ``ours`` would (a key
    only one of them sets falls to RecBole's default in the other: unknown here, so no)."""
    return all(ours.get(k) == theirs.get(k) or None not in (listed(ours, k), listed(theirs, k))
               and listed(ours, k) <= listed(theirs, k) for k in REPORT_ONLY)






@lru_cache(maxsize=None)
def technique_keys():
    """The settings the knowledge techniques read: those their property files declare (read once
    per process: every cell's staleness and twin check asks)."""
    folder = os.path.join(ROOT, "recbole_llmk", "properties", "technique")
    keys = set()
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            keys |= set(yaml.safe_load(f) or {})
    return frozenset(keys)


def run_differences(model, ours, theirs):
    """The settings in which a run of ``model`` under ``theirs`` (a finished cell's recorded
    settings; None: it recorded none) is another run than one under ``ours``: where files go does
    not count, nor what a stock model never reads (the techniques' settings), nor the metrics
    reported as long as ``theirs`` reported all of ours; -> sorted keys, empty for the same run."""
    if theirs is None:
        return ["(settings not recorded)"]
    ignored = set(REPORT_ONLY) | set(WHERE_ONLY) | (technique_keys() if is_stock(model) else set())
    theirs = {**old_values(model, ours), **theirs}
    keys = {k for k in set(ours) | set(theirs) if k not in ignored and ours.get(k) != theirs.get(k)}
    if not reports_at_most(ours, theirs):
        keys |= {k for k in REPORT_ONLY if ours.get(k) != theirs.get(k)}
    return sorted(keys)


def stale_keys(suite, cell):
    """How a finished cell's run differs from what the suite asks of it now (see
    ``run_differences``); empty when it is current or its entry is gone (the summary skips it)."""
    entry = {e["label"]: e for e in entries(suite)}.get(cell["model"])
    if entry is None:
        return []
    return run_differences(entry["model"], cell_settings(suite, entry, cell["seed"]), cell.get("settings"))


def twin_cell(suite, model, ours, seed, results):
    """The finished cell of a suite in ``suite['reuse_cells_from']`` (its results beside this
    suite's, under ``results``) that is the same run as this suite's cell of ``model`` with the
    settings ``ours``: the same model, dataset and seed, and recorded settings that differ in
    nothing ``run_differences`` counts; -> its path or None. Running it again would spend hours
    to repeat a deterministic run (two suites share their SASRec rows on Beauty)."""
    for path in suite.get("reuse_cells_from") or []:
        other = load_suite(path)
        for candidate in entries(other):
            found = cell_file(os.path.join(results, other["name"]), candidate["label"], seed)
            if candidate["model"] != model or not os.path.isfile(found):
                continue
            with open(found) as f:
                cell = json.load(f)
            if cell.get("dataset") == suite["dataset"] and not run_differences(model, ours, cell.get("settings")):
                return found
    return None


def reuse_cell(twin, label, settings, output):
    """Write ``twin`` (another suite's cell of the same run) as this suite's cell ``label``, with
    only the metrics this suite's cell ``settings`` report, so that its rows compare like with like.
    It keeps the twin's settings: they are what ran."""
    with open(twin) as f:
        cell = json.load(f)
    metrics = listed(settings, "metrics") or set()
    topk = {int(k) for k in listed(settings, "topk") or ()}

    def reported(name):
        metric, _, k = name.partition("@")
        return (not metrics or metric in metrics) and (not k or not topk or int(k) in topk)

    for key in ("test", "valid", "test_prestored"):
        if key in cell:
            cell[key] = {name: value for name, value in cell[key].items() if reported(name)}
    cell["model"] = label
    # a twin that is itself a copy names where the run happened, so the chain never hides it
    cell["same_run_as"] = cell.get("same_run_as") or os.path.relpath(
        twin, os.path.dirname(os.path.dirname(os.path.dirname(output))))
    users = read_users(users_file(twin))
    if users:  # the twin's test users, with the same metrics as the cell (before it: see run_suite)
        write_users(users_file(output), {name: values for name, values in users.items() if name == USER or reported(name)})
    with written_whole(output) as tmp, open(tmp, "w") as f:
        json.dump(cell, f, indent=2)
