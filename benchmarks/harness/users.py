"""Each test user's value of a cell's top-k metrics (``<results>/<suite>/users/<label>-<seed>.csv.gz``):
what the sample of test users leaves uncertain, beside what the seeds do.

A suite's paired t-test varies the training seed (on a leave-one-out split, one split of the
data); a few seeds on one split say nothing of how a difference would move with other users.
The interval over the users pairs stock and variant user by user, so a cell records every test
user's value of the metrics RecBole averages."""

import csv
import gzip
import io
import os

from harness.schema import cell_file
from recbole_llmk.files import written_whole

USER = "user"


def evaluated_per_user(trainer, data, load_best_model=False):
    """RecBole's evaluation of ``data`` (``trainer.evaluate``, the same result) and each user's
    value of every top-k metric in it, in the evaluator's order: -> (result, {"user": tokens,
    "ndcg@10": values, ...}), values rounded to 5 digits; (result, None) without a top-k metric
    (e.g. AUC alone) or for an evaluation that is not full-sort."""
    from recbole.data.dataloader import FullSortEvalDataLoader
    from recbole.evaluator.base_metric import TopkMetric

    if not isinstance(data, FullSortEvalDataLoader):  # sampled ranking: its users are not one per row
        return trainer.evaluate(data, load_best_model=load_best_model, show_progress=False), None
    evaluator, seen = trainer.evaluator, {}
    whole = evaluator.evaluate

    def keeping(struct):
        seen["struct"] = struct
        return whole(struct)

    evaluator.evaluate = keeping  # the collector drops the top-k table once the evaluator has it
    try:
        result = trainer.evaluate(data, load_best_model=load_best_model, show_progress=False)
    finally:
        del evaluator.evaluate
    users = {}
    for name in result:
        metric, _, k = name.partition("@")
        scorer = evaluator.metric_class.get(metric)
        if k and isinstance(scorer, TopkMetric):
            values = per_user(scorer, seen["struct"])[:, int(k) - 1]
            users[name] = [round(float(v), 5) for v in values]
    if not users:
        return result, None
    return result, {USER: user_tokens(data), **users}


def per_user(scorer, struct):
    """A top-k metric's (users x k) table: what its ``calculate_metric`` averages. Its
    ``metric_info`` takes the first of ``used_info``'s (positions, counts) or both (Hit and MRR
    take the positions alone)."""
    import inspect

    info = scorer.used_info(struct)
    return scorer.metric_info(*info[:len(inspect.signature(scorer.metric_info).parameters)])


def user_tokens(data):
    """The users of a full-sort evaluation loader in the order it scores them: one per user for a
    general model, one per evaluated interaction for a sequential one."""
    dataset = data._dataset
    ids = dataset.inter_feat[dataset.uid_field] if data.is_sequential else data.uid_list
    return [str(token) for token in dataset.id2token(dataset.uid_field, ids.numpy())]


def users_file(cell_path):
    """Where a cell's users go: beside its cell file (``<suite>/cells/X.json`` -> ``<suite>/users/X.csv.gz``)."""
    cells, name = os.path.split(cell_path)
    return os.path.join(os.path.dirname(cells), "users", name[:-len(".json")] + ".csv.gz")


def write_users(path, users):
    """``users`` (from :func:`evaluated_per_user`) as a gzipped CSV, one row per user, written
    whole; the same values give the same bytes (no time stamp in the gzip header)."""
    metrics = [name for name in users if name != USER]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([USER] + metrics)
    writer.writerows(zip(users[USER], *(users[m] for m in metrics)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with written_whole(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.getvalue().encode())


def copy_users(cell_from, cell_to):
    """Copy the users beside the cell file ``cell_from`` to beside ``cell_to``, whole (none: nothing)."""
    import shutil

    source = users_file(cell_from)
    if os.path.isfile(source):
        os.makedirs(os.path.dirname(users_file(cell_to)), exist_ok=True)
        with written_whole(users_file(cell_to)) as tmp:
            shutil.copy2(source, tmp)


def read_users(path):
    """A users file as {"user": tokens, metric: values}; None where there is none."""
    if not os.path.isfile(path):
        return None
    with gzip.open(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    columns = list(zip(*body)) or [()] * len(header)
    return {name: list(column) if name == USER else [float(v) for v in column] for name, column in zip(header, columns)}


def cell_users(folder, cell):
    """A finished cell's users, if they average to its test metrics (RecBole rounds those to 4
    digits); None where the cell recorded none, or a file left by another run of the cell
    disagrees with it (then no interval rather than a wrong one)."""
    users = read_users(users_file(cell_file(folder, cell["model"], cell["seed"])))
    if users is None:
        return None
    for name, values in users.items():
        if name != USER and (name not in cell["test"] or abs(sum(values) / len(values) - cell["test"][name]) > 6e-5):
            return None
    return users
