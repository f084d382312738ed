"""Which technique serves which RecBole model: docs/coverage.md's table, computed from the code.

    python -m recbole_llmk.coverage                 # print the markdown table
    python -m recbole_llmk.coverage --markdown docs/coverage.md \
        --sweep benchmarks/results/recbole_model_tests/runs.jsonl  # rewrite the table between its markers

Every model class in RecBole's general, sequential and context-aware packages, crossed with every
technique: a variant is supported when it resolves (``get_model``) and, for variants that fuse
knowledge into ID tables, when the model built on RecBole's bundled ml-100k has them (the check a
run makes before any knowledge is built); otherwise the cell holds the one-line reason the plugin
gives. Nothing is trained and no knowledge is built.
"""

import argparse
import inspect
import logging
import os
import pkgutil
import re
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

FAMILIES = ("general", "sequential", "context_aware")
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def recbole_models():
    """``{family: [model name, ...]}`` for RecBole's general, sequential and context-aware packages."""
    import importlib

    from recbole.model.abstract_recommender import AbstractRecommender

    models = {}
    for family in FAMILIES:
        package = importlib.import_module(f"recbole.model.{family}_recommender")
        names = set()
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            names |= {n for n, c in inspect.getmembers(module, inspect.isclass)
                      if issubclass(c, AbstractRecommender) and c.__module__ == module.__name__}
        models[family] = sorted(names)
    return models


def reason(error, model):
    """The plugin's refusal, as one short clause for a table cell (the row names the model)."""
    text = str(error).split(". Checked before")[0].split(" What fits")[0]
    text = re.sub(r" \(a direct nn\.Embedding[^)]*\)", "", text)
    text = re.sub(r" for the fusion of \w+ knowledge", "", text)
    text = re.sub(r"^\S+ is not supported: ", "", text)
    return re.sub(rf"^{model} (is |has )?", "", text).rstrip(".")


class TrainingDatasets:
    """A training dataset on ml-100k per dataset class RecBole would build (general, sequential,
    a model's own ``<Model>Dataset``), built once per class: a model's ID tables are sized by it."""

    def __init__(self, folder):
        self.settings = {"checkpoint_dir": folder, "state": "ERROR", "show_progress": False,
                         "train_neg_sample_args": None}
        self.by_class = {}

    def of(self, name):
        """``(config, training dataset)`` for the variant ``name``."""
        import recbole.data.dataset as datasets

        from recbole_llmk.config import LLMKConfig
        from recbole_llmk.quick_start import prepare

        with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
            config = LLMKConfig(name, "ml-100k", config_dict=self.settings)
            base = config["base_model"]
            key = config["MODEL_TYPE"], base if hasattr(datasets, f"{base}Dataset") else None
            if key not in self.by_class:
                self.by_class[key] = prepare(name, "ml-100k", config_dict=self.settings)[2]._dataset
        return config, self.by_class[key]


def support(name, datasets):
    """``None`` when ``name`` (``<Model>_<Technique>[_<Technique>...]``) is supported, else the
    reason it is not."""
    from recbole_llmk.utils import get_model, split_techniques

    model = split_techniques(name)[0]
    try:
        variant = get_model(name)
    except ValueError as error:
        return reason(error, model)
    if not hasattr(variant, "check_fits"):
        return None
    try:
        with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
            config, dataset = datasets.of(name)
            variant.check_fits(config, dataset)
    except ValueError as error:
        if "is not supported" in str(error):
            return reason(error, model)
        return not_checked(model, error)
    except Exception as error:
        return not_checked(model, error)
    return None


def not_checked(model, error):
    """The stock model itself does not build on ml-100k's defaults (it needs features, a KG)."""
    what = str(error).splitlines()[0] if str(error) else ""
    what = re.sub(r"\[[^]]*/([^/\]]+)\]", r"\1", what)  # a file's name, not this machine's path
    return f"not checked: the stock model needs data or settings ml-100k's defaults lack ({type(error).__name__}{': ' + what if what else ''})"


COMPOSED = "composed"  # the column of the model's supported techniques in one model


def composed_support(model, cells, datasets):
    """The model's supported techniques composed in one model (``<Model>_<T1>_<T2>...``): its name
    when supported, the reason when not, ``None`` when fewer than two techniques serve the model."""
    supported = [t for t, why in cells.items() if why is None]
    if len(supported) < 2:
        return None
    name = "_".join((model, *supported))
    why = support(name, datasets)
    return ("✓ " + name) if why is None else f"– {why}"


def coverage():
    """``[(family, model, {technique: reason or None, "composed": cell or None})]``."""
    from recbole_llmk.utils import TECHNIQUES

    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as folder:
            cwd = os.getcwd()
            os.chdir(folder)  # RecBole writes its log folder under the working directory
            try:
                datasets = TrainingDatasets(folder)
                rows = [(family, model, {t: support(f"{model}_{t}", datasets) for t in TECHNIQUES})
                        for family, models in recbole_models().items() for model in models]
                for _, model, cells in rows:
                    cells[COMPOSED] = composed_support(model, cells, datasets)
                return rows
            finally:
                os.chdir(cwd)
    finally:
        logging.disable(logging.NOTSET)


TRAINED = "✓ trained"  # supported, and RecBole's own model test of it passed through the plugin


def trained_variants(sweep):
    """Variants that passed RecBole's own model tests through the plugin: the ``passed`` runs of
    ``benchmarks/recbole_model_tests.py``'s ``runs.jsonl`` (its last record of each run counts)."""
    import json

    last = {}
    with open(sweep, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                run = json.loads(line)
                last[(run["test"], run["variant"])] = run["status"]
    return {variant for (_, variant), status in last.items() if status == "passed"}


def markdown(rows, trained=None):
    from recbole_llmk.utils import TECHNIQUES

    trained = trained or set()
    lines = ["| family | model | " + " | ".join(TECHNIQUES) + f" | {COMPOSED} |", "|---|---|" + "---|" * (len(TECHNIQUES) + 1)]
    for family, model, cells in rows:
        shown = [(TRAINED if f"{model}_{t}" in trained else "✓") if cells[t] is None else f"– {cells[t]}"
                 for t in TECHNIQUES]
        shown.append(cells.get(COMPOSED) or "")
        lines.append(f"| {family.replace('_', '-')} | {model} | " + " | ".join(shown) + " |")
    counts = {t: sum(cells[t] is None for _, _, cells in rows) for t in TECHNIQUES}
    composed = sum((cells.get(COMPOSED) or "").startswith("✓") for _, _, cells in rows)
    trained_counts = {t: sum(cells[t] is None and f"{m}_{t}" in trained for _, m, cells in rows) for t in TECHNIQUES}
    lines.append("")
    lines.append(f"{len(rows)} RecBole models; supported: "
                 + ", ".join(f"{t} {n}" for t, n in counts.items())
                 + f"; all its supported techniques composed in one model: {composed}"
                 + ("; trained by RecBole's own model tests: " + ", ".join(f"{t} {n}" for t, n in trained_counts.items())
                    if trained else "")
                 + ". Generated by `python -m recbole_llmk.coverage --markdown docs/coverage.md"
                 + (" --sweep benchmarks/results/recbole_model_tests/runs.jsonl" if trained else "") + "`.")
    return "\n".join(lines)


def rewrite_between_markers(path, table):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers to put the table between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    from recbole_llmk.files import written_whole

    with written_whole(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="rewrite the table between the coverage markers of this file")
    parser.add_argument("--sweep", help="runs.jsonl of benchmarks/recbole_model_tests.py: mark the variants "
                                        "RecBole's own model tests trained")
    args = parser.parse_args(argv)
    table = markdown(coverage(), trained_variants(args.sweep) if args.sweep else None)
    if args.markdown:
        rewrite_between_markers(args.markdown, table)
    print(table)


if __name__ == "__main__":
    main()
