"""UAUC and WUAUC as RecBole ranking metrics (``metrics: [..., 'UAUC', 'WUAUC']``).

- UAUC: the mean over users of the user's AUC, every user counting once.
- WUAUC: the same, each user weighted by their number of evaluated positive samples (the user's
  ground-truth interactions in the valid/test split). This weighting equals RecBole's GAUC.

A user's AUC is the fraction of (positive, negative) pairs the scores order correctly, ties counted
as half, over every candidate the evaluator scored for that user: in full-sort mode all items
except the padding id and the masked history (RecBole scores those ``-inf``), in ``uniN``/``popN``
mode the sampled candidates. It is computed exactly from RecBole's ``rec.meanrank`` data (per user:
sum of the positives' tie-averaged descending ranks, number of scored candidates, number of
positives), which the collector builds from the full score matrix; ``rec.topk`` only sees the top
``max(topk)`` items and ``rec.score`` carries no positives, so neither would do. Users without a
positive or without a negative have no AUC and are left out.

RecBole finds metrics in dicts that ``recbole.evaluator.register`` builds once, at import, from the
classes of ``recbole.evaluator.metrics``; ``register_metrics`` adds these two classes to those
same dicts (shared with ``recbole.config`` and the evaluator), which is all RecBole reads.
"""

import numpy as np
from recbole.evaluator.base_metric import AbstractMetric
from recbole.utils import EvaluatorType


def user_aucs(mean_rank):
    """Per-user AUC and positive count from ``rec.meanrank`` ``[n_users, 3]`` (positive rank
    sum, scored candidates, positives); users with no positive or no negative are dropped."""
    rank_sum, scored, positives = (np.asarray(c, dtype=np.float64) for c in np.asarray(mean_rank).T)
    negatives = scored - positives
    keep = (positives > 0) & (negatives > 0)
    rank_sum, scored, positives, negatives = rank_sum[keep], scored[keep], positives[keep], negatives[keep]
    # pairs ordered correctly = sum over positives of the candidates ranked below them, minus the
    # positive-positive pairs among those
    correct = positives * scored - positives * (positives - 1) / 2 - rank_sum
    return correct / (positives * negatives), positives


class _UserAUC(AbstractMetric):
    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.meanrank"]
    weighted = False

    def calculate_metric(self, dataobject):
        aucs, positives = user_aucs(dataobject.get("rec.meanrank").numpy())
        if len(aucs) == 0:
            value = float("nan")
        else:
            value = float(np.average(aucs, weights=positives if self.weighted else None))
        return {type(self).__name__.lower(): round(value, self.decimal_place)}


class UAUC(_UserAUC):
    """Mean per-user AUC (every user weighs the same)."""


class WUAUC(_UserAUC):
    """Per-user AUC weighted by the user's number of evaluated positive samples."""

    weighted = True


PLUGIN_METRICS = (UAUC, WUAUC)


def register_metrics():
    """Make this module's metrics known to RecBole's config, collector and evaluator. Idempotent."""
    from recbole.evaluator import register

    for metric in PLUGIN_METRICS:
        name = metric.__name__.lower()
        register.metrics_dict[name] = metric
        register.metric_information[name] = metric.metric_need
        register.metric_types[name] = metric.metric_type
        if metric.smaller and name not in register.smaller_metrics:
            register.smaller_metrics.append(name)
