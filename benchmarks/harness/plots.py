"""The summary's plots: relative change per variant, and cost against quality."""

from harness.statistics import relative_changes


def plot_uplift(cells, suite, metric, path):
    """Bar per variant: mean relative change of ``metric`` over seeds, error bar = std over seeds
    (none for one seed); each bar's label says how many seeds it pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    changes = relative_changes(cells, suite, metric)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * max(len(changes), 1), 3.2))
    names = list(changes)
    means = [100 * np.mean(changes[n]) for n in names]
    stds = [100 * np.std(changes[n], ddof=1) if len(changes[n]) > 1 else np.nan for n in names]
    labels = [f"{n} ({len(changes[n])} seed{'s' if len(changes[n]) > 1 else ''})" for n in names]
    ax.bar(labels, means, yerr=stds, capsize=4, color=["tab:green" if m >= 0 else "tab:red" for m in means])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    ax.set_ylabel(f"{metric} change vs stock (%)")
    ax.set_title(f"{suite['name']} on {suite['dataset']}: mean ± std over the seeds each pair ran")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cost(rows, metric, path):
    """Cost/quality curve: ``metric`` (mean ± std over seeds) against the prompts one store
    needs, for every entry that built knowledge (individual vs collective vs sampled seeds...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("llm_prompts") and f"{metric}_mean" in r]
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in points:
        ax.errorbar(r["llm_prompts"], r[f"{metric}_mean"], yerr=r.get(f"{metric}_std"), fmt="o", capsize=3)
        ax.annotate(r["model"], (r["llm_prompts"], r[f"{metric}_mean"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("prompts per knowledge store (LLM calls with a real LLM)")
    ax.set_ylabel(f"test {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
