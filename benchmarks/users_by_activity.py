"""Where a knowledge row gains or loses: its test change against its stock row by how many
training interactions the test users have, in groups of equal size, each with its 95 % interval
over the group's users.

    python benchmarks/users_by_activity.py benchmarks/suites/reki_general_ml100k_splits.yaml [--only BPR_REKI,BPR_REKI-constant] [--groups 4]

Reads the test users each finished cell recorded (``results/<suite>/users/``, see
``harness/users.py``) on the seeds a row and its stock both ran, and each user's training
interactions from the split RecBole builds for the stock row's cell of that seed (the dataset is
loaded as the cell loads it; nothing is trained). A user's count, stock value and difference are
its means over those seeds. Writes ``results/<suite>/users_by_activity.md``. Not part of the
test suite.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from harness.schema import cell_config, entries, load_suite, read_cell  # noqa: E402
from harness.statistics import normal_half_width  # noqa: E402
from harness.users import USER, cell_users  # noqa: E402
from recbole_llmk.files import written_whole  # noqa: E402


def training_counts(suite, entry, seed):
    """{user token: training interactions} of the split the cell (``entry``, ``seed``) trains on."""
    from recbole_llmk.knowledge.history import training_dataset, training_interactions
    from recbole_llmk.quick_start import prepare

    sys.argv = sys.argv[:1]  # RecBole's Config reads argv
    config = dict(cell_config(suite, entry, seed), state="WARNING")  # the split only: RecBole's log level
    _, _, train_data, _, _ = prepare(entry["model"], suite["dataset"], config_dict=config)
    users = training_interactions(training_dataset(train_data))["user"]
    return {str(user): int(n) for user, n in users.value_counts().items()}


def per_user(users, metric):
    """{token: mean value} (a sequential split may score a user in several rows)."""
    sums = {}
    for token, value in zip(users[USER], users[metric]):
        sums.setdefault(token, []).append(value)
    return {token: sum(values) / len(values) for token, values in sums.items()}


def by_activity(counts, stock, variant, metric, groups):
    """Rows per activity group (fewest training interactions first): counts, users, stock's mean,
    the variant's relative change and the half-width of its 95 % interval over the group's users.
    ``counts``, ``stock`` and ``variant`` map each shared seed to that seed's training counts and
    users (``harness.users``); a user's figures are its means over the seeds."""
    import numpy as np

    seeds = sorted(stock)
    ours = [per_user(variant[s], metric) for s in seeds]
    theirs = [per_user(stock[s], metric) for s in seeds]
    tokens = sorted(set.intersection(*(set(t) for t in theirs + ours)))
    count = np.array([np.mean([counts[s].get(t, 0) for s in seeds]) for t in tokens])
    base = np.array([np.mean([v[t] for v in theirs]) for t in tokens])
    difference = np.array([np.mean([o[t] - v[t] for o, v in zip(ours, theirs)]) for t in tokens])
    order = np.lexsort((np.arange(len(tokens)), count))  # fewest first; ties in token order
    rows = []
    for part in np.array_split(order, groups):
        d, b = difference[part], base[part]
        rows.append({"interactions": f"{count[part].min():.0f}-{count[part].max():.0f}", "users": len(part),
                     "stock": b.mean(), "change": d.mean() / b.mean(),
                     "half": normal_half_width(d) / b.mean()})
    return rows


def report(suite, folder, labels, groups, metric):
    by_label = {e["label"]: e for e in entries(suite)}
    counts, lines = {}, [f"{metric} against the stock row by the test users' training interactions "
                         f"({groups} groups of equal size; a user's figures are its means over the seeds)", ""]
    for label in labels:
        entry = by_label[label]
        stock_entry = by_label.get(entry["stock"])
        if stock_entry is None:
            continue
        stock, variant = {}, {}
        for seed in suite["seeds"]:
            cells = [read_cell(folder, name, seed) for name in (entry["stock"], label)]
            users = [cell_users(folder, cell) if cell else None for cell in cells]
            if all(users) and all(metric in u for u in users):
                stock[seed], variant[seed] = users
        if not stock:
            print(f"{label}: no seed on which it and {entry['stock']} both recorded their test users", flush=True)
            continue
        for seed in stock:
            if seed not in counts:
                print(f"seed {seed}: loading the split ...", flush=True)
                counts[seed] = training_counts(suite, stock_entry, seed)
        rows = by_activity({s: counts[s] for s in stock}, stock, variant, metric, groups)
        lines += [f"**{label}** against {entry['stock']}, seeds {', '.join(map(str, sorted(stock)))}", "",
                  "| training interactions | users | stock | change, 95 % CI over the users |", "|---|---|---|---|"]
        lines += [f"| {r['interactions']} | {r['users']} | {r['stock']:.4f} | {100 * r['change']:+.1f} % "
                  f"± {100 * r['half']:.1f} |" for r in rows] + [""]
    lines.append(f"Produced by `python benchmarks/users_by_activity.py {os.path.relpath(suite['file'], ROOT)}"
                 f"{' --only ' + ','.join(labels) if labels != default_labels(suite) else ''} --groups {groups} "
                 f"--metric {metric}` on {time.strftime('%Y-%m-%d')} from the cells' users (each cell's provenance, "
                 f"in cells/, names its code, libraries, threads and device).")
    text = "\n".join(lines) + "\n"
    with written_whole(os.path.join(folder, "users_by_activity.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    return text


def default_labels(suite):
    """Every row with a stock row to compare with."""
    return [e["label"] for e in entries(suite) if e["stock"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", default=None, help="comma-separated labels (default: every row with a stock row)")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--metric", default=None, help="default: the suite's plot_metric, else ndcg@10")
    args = parser.parse_args()
    suite = load_suite(os.path.abspath(args.suite))
    folder = os.path.abspath(os.path.join(args.results, suite["name"]))
    labels = args.only.split(",") if args.only else default_labels(suite)
    unknown = sorted(set(labels) - {e["label"] for e in entries(suite)})
    if unknown:
        raise SystemExit(f"--only names no entry of the suite: {', '.join(unknown)}")
    metric = (args.metric or suite.get("plot_metric") or "ndcg@10").lower()
    os.chdir(folder)  # RecBole's logs and the knowledge paths are the cells' (relative to the results folder)
    print(report(suite, folder, labels, args.groups, metric))


if __name__ == "__main__":
    main()
