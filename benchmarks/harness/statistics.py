"""The summary's numbers: means over seeds and paired comparisons (t-test, confidence interval) on matched seeds."""

from collections import Counter

from harness.schema import entries


def mixed_pairs(runs, others):
    """What the seed pairs of two rows mix, which a paired test should not: '‡' CPU with GPU cells,
    '†' cells of different commits (among those that recorded one); '' when neither."""
    shared = sorted(set(runs) & set(others))
    marks = ""
    if any(ran_on(runs[s]) != ran_on(others[s]) for s in shared):
        marks += "‡"
    commits = {c["provenance"]["commit"] for s in shared for c in (runs[s], others[s])
               if (c.get("provenance") or {}).get("commit")}
    if len(commits) > 1:
        marks += "†"
    return marks


def paired_change(runs, others, metric):
    """(relative change of the mean, paired t-test p, why there is no test) of ``metric`` on the
    seeds both ran; p is None, and the reason says why, where :func:`untested` finds no test."""
    from scipy import stats

    ours, theirs = paired_values(runs, others, metric)
    reason = untested(ours - theirs)
    return (ours.mean() - theirs.mean()) / theirs.mean(), None if reason else stats.ttest_rel(ours, theirs).pvalue, reason


def untested(diff):
    """Why paired differences allow no t-test; None when they allow one. One shared seed has no
    spread; nor do differences equal on every seed, which happens (RecBole records metrics to 4
    decimals): the t statistic is then infinite, and its p of 0 would claim certainty from two ties."""
    if len(diff) < 2:
        return "1 shared seed"
    if diff.max() - diff.min() < 1e-9:
        return f"the same difference on all {len(diff)} seeds"
    return None


def paired_values(runs, others, metric):
    import numpy as np

    shared = sorted(set(runs) & set(others))
    return (np.array([runs[s]["test"][metric] for s in shared]), np.array([others[s]["test"][metric] for s in shared]))


def paired_interval(runs, others, metric, level=0.95):
    """The ``level`` confidence interval of the paired difference's mean (t distribution over the
    shared seeds), relative to the other row's mean; None where :func:`untested` finds no test."""
    import numpy as np
    from scipy import stats

    ours, theirs = paired_values(runs, others, metric)
    diff = ours - theirs
    if untested(diff):
        return None
    half = stats.t.ppf((1 + level) / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return (diff.mean() - half) / theirs.mean(), (diff.mean() + half) / theirs.mean()


def users_interval(runs, others, metric, users_of, level=0.95):
    """The ``level`` interval of the paired difference's mean over the test users (normal
    approximation: hundreds of users or more), relative to the other row's mean: each user's
    difference averaged over the shared seeds. None unless every shared seed's two cells
    recorded the same users (``users_of(cell)``, see ``harness.users``) with ``metric``."""
    import numpy as np

    differences, bases = [], []
    for seed in sorted(set(runs) & set(others)):
        ours, theirs = users_of(runs[seed]), users_of(others[seed])
        if not ours or not theirs or metric not in ours or metric not in theirs or ours["user"] != theirs["user"]:
            return None
        differences.append(np.array(ours[metric]) - np.array(theirs[metric]))
        bases.append(np.mean(theirs[metric]))
    if not differences or len(differences[0]) < 2:
        return None
    difference = np.mean(differences, axis=0)
    half = normal_half_width(difference, level)
    base = np.mean(bases)
    return (difference.mean() - half) / base, (difference.mean() + half) / base


def normal_half_width(values, level=0.95):
    """Half the width of the normal-approximation ``level`` interval of ``values``' mean."""
    import numpy as np
    from scipy import stats

    return stats.norm.ppf((1 + level) / 2) * np.std(values, ddof=1) / np.sqrt(len(values))


def compare(row, against, runs, others, metric, users_of=None):
    """Put ``runs``' paired comparison with ``others`` on ``metric`` in ``row``, under keys ending in
    ``against`` ('' for the stock backbone, '_versus' for the entry a row names)."""
    key = f"{metric}{against}"
    row[f"{key}_rel"], row[f"{key}_p"], reason = paired_change(runs, others, metric)
    row[f"{key}_ci"] = paired_interval(runs, others, metric)
    if reason:
        row[f"{key}_untested"] = reason
    if users_of:
        interval = users_interval(runs, others, metric, users_of)
        if interval:
            row[f"{key}_users_ci"] = interval


TIME_KEYS = ("train_epoch_seconds", "train_batch_ms", "infer_batch_ms", "infer_batch_ms_prestored")


def ran_on(cell):
    """'GPU' or 'CPU': where a cell trained (cells from before that was recorded tell by the peak
    GPU memory only a CUDA machine records)."""
    device = cell.get("device") or ("cuda" if "peak_gpu_mb" in cell else "cpu")
    return "GPU" if device.startswith("cuda") else "CPU"


def summarize(suite, cells, users_of=None):
    """Rows of mean ± std per model, paired t-test against the stock backbone (and against the
    ``versus`` entry, when named) on shared seeds; with ``users_of(cell)`` (a cell's test users,
    or None), also the difference's interval over the test users where both rows recorded them."""
    import numpy as np

    by_model = {}
    for cell in cells:
        by_model.setdefault(cell["model"], {})[cell["seed"]] = cell
    rows = []
    for entry in entries(suite):
        model, base = entry["label"], entry["stock"]
        runs = by_model.get(model, {})
        if not runs:
            continue
        row = {"model": model, "seeds": len(runs)}
        for metric in sorted(next(iter(runs.values()))["test"]):
            values = np.array([runs[s]["test"][metric] for s in sorted(runs)])
            row[f"{metric}_mean"] = values.mean()
            if len(values) > 1:  # one seed has no spread: leave it out rather than print ± 0
                row[f"{metric}_std"] = values.std(ddof=1)
            if base and base in by_model:
                compare(row, "", runs, by_model[base], metric, users_of)
                row["mixed"] = mixed_pairs(runs, by_model[base])
            if entry["versus"] in by_model:
                row["versus"] = entry["versus"]
                compare(row, "_versus", runs, by_model[entry["versus"]], metric, users_of)
                row["versus_mixed"] = mixed_pairs(runs, by_model[entry["versus"]])
        devices = Counter(ran_on(c) for c in runs.values())
        row["ran_on"] = ", ".join(f"{device} {n}" for device, n in sorted(devices.items()))
        # a mean of CPU and GPU epochs times neither: a row whose cells ran on both gives no times
        timed = TIME_KEYS if len(devices) == 1 else ()
        for key in timed + ("knowledge_seconds", "peak_rss_mb", "epochs_run"):
            values = [c[key] for c in runs.values() if c.get(key) is not None]
            if values:
                row[key] = float(np.mean(values))
        costs = [c["knowledge"] for c in runs.values() if c.get("knowledge")]
        if costs:  # what building one store cost (REKI's Table 6 "# call"): prompts, calls sent, tokens
            row["llm_prompts"] = float(np.mean([k["requested"] for k in costs]))
            row["llm_calls"] = float(np.mean([k["called"] for k in costs]))
            row["llm_tokens"] = float(np.mean([k["prompt_tokens"] + k["completion_tokens"] for k in costs]))
        rows.append(row)
    return rows


def relative_changes(cells, suite, metric):
    """Per variant: the per-seed relative change of ``metric`` against its stock backbone."""
    by = {(c["model"], c["seed"]): c["test"][metric] for c in cells}
    changes = {}
    for entry in entries(suite):
        model, base = entry["label"], entry["stock"]
        if base:
            pairs = [(by[(model, s)], by[(base, s)]) for s in suite["seeds"] if (model, s) in by and (base, s) in by]
            if pairs:
                changes[model] = [(ours - theirs) / theirs for ours, theirs in pairs]
    return changes
