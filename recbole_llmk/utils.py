"""Model resolution and RecBole's name-keyed lookups, seen through the base model's name.

A variant such as ``DIN_REKI`` is built on the fly from RecBole's ``DIN`` and the REKI technique.
RecBole finds a model's dataset class (``<Model>Dataset``), dataloader (a fixed list of names)
and trainer (``<Model>Trainer``) by the model's name, so every such lookup here runs under the
base model's name: a variant gets exactly the dataset, split, loaders and trainer RecBole gives
the stock model.
"""

import importlib
from contextlib import contextmanager
from functools import lru_cache

from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_llmk.trainer import plugin_trainer_class

# technique suffix -> "module:factory"; a factory turns a RecBole model class into the variant.
TECHNIQUES = {
    "REKI": "recbole_llmk.model.reki:reki_variant",
    "ReLand": "recbole_llmk.model.reland:reland_variant",
    "LEARN": "recbole_llmk.model.learn:learn_variant",
}
# models of this plugin that are not variants of a RecBole model.
NATIVE_MODELS = {
    "LEARN": "recbole_llmk.model.learn:LEARN",
}


def _load(target):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


# RecBole tries its optional lightgbm/xgboost models last, so an unknown name ends in their ImportError.
OPTIONAL_LIBRARIES = ("lightgbm", "xgboost")


def get_recbole_model(name):
    """RecBole's model class, with a clear error instead of RecBole's lightgbm ImportError, and
    another for an install whose packages do not fit together (RecBole imports all its models)."""
    try:
        return recbole_get_model(name)
    except ValueError:
        pass
    except (ImportError, AttributeError) as error:  # e.g. a scipy built for numpy 2 meeting numpy<2
        if not (isinstance(error, ImportError) and error.name in OPTIONAL_LIBRARIES):
            raise ImportError(f"RecBole's models failed to import while looking up [{name}]: "
                              f"{type(error).__name__}: {error}. The installed packages do not fit together; "
                              f"reinstall as the README says (pip install -e .), which pins numpy<2, pandas<3 "
                              f"and scipy<1.13 for RecBole 1.2.1.") from error
    raise ValueError(
        f"[{name}] is not a RecBole model. Use a RecBole model name (e.g. DeepFM, DIN, SASRec), "
        f"one of this plugin's models {sorted(NATIVE_MODELS)}, or <Model>_<Technique> with a "
        f"technique in {sorted(TECHNIQUES)} (several compose: <Model>_ReLand_REKI)."
    )


@lru_cache(maxsize=None)
def get_model(name):
    """Resolve ``name``: a plugin model, ``<Base>_<Technique>``, ``<Base>_<T1>_<T2>...`` (techniques
    composed: ``model/composed.py``), or a stock RecBole model."""
    if name in NATIVE_MODELS:
        return _load(NATIVE_MODELS[name])
    base, techniques = split_techniques(name)
    if len(techniques) == 1:
        return _load(TECHNIQUES[techniques[0]])(get_recbole_model(base))
    if techniques:
        from recbole_llmk.model.composed import composed_variant

        return composed_variant(get_recbole_model(base), techniques)
    return get_recbole_model(name)


def split_techniques(name):
    """``("SASRec", ("ReLand", "REKI"))`` for ``SASRec_ReLand_REKI``: the base name and the
    technique suffixes, in order (none for a stock model)."""
    words = name.split("_")
    techniques = []
    while len(words) > 1 and words[-1] in TECHNIQUES:
        techniques.insert(0, words.pop())
    return "_".join(words), tuple(techniques)


def base_model_name(config):
    return config["base_model"] or config["model"]


@contextmanager
def as_base_model(config):
    """Let RecBole's name-keyed lookups see the base model's name for the duration."""
    name = config["model"]
    config["model"] = base_model_name(config)
    try:
        yield config
    finally:
        config["model"] = name


def create_dataset(config):
    with as_base_model(config):
        return recbole_create_dataset(config)


def data_preparation(config, dataset):
    with as_base_model(config):
        return recbole_data_preparation(config, dataset)


def get_trainer(config):
    """RecBole's trainer for the base model, saving weights-only-loadable checkpoints, resumable."""
    return plugin_trainer_class(recbole_get_trainer(config["MODEL_TYPE"], base_model_name(config)))
