"""RecBole's Config, resolving this plugin's models and layering its yaml defaults.

Precedence, lowest first: RecBole's own defaults for the *base* model (its model yaml, dataset
yaml and quick-start settings such as DIN's labeled AUC evaluation) < the plugin's
``properties/overall.yaml`` < ``properties/technique/<Technique>.yaml`` <
``properties/model/<Model>.yaml`` < ``properties/dataset/<dataset>.yaml`` < the user's config
files < config dict < command line (``--key=value``), exactly as in RecBole.
"""

import difflib
import glob
import logging
import os
import sys
from functools import lru_cache

import yaml
from recbole.config import Config

from recbole_llmk.compat import check_stack
from recbole_llmk.defaults import PROPERTIES
from recbole_llmk.distributed import backend_of, join_on_cpu
from recbole_llmk.metrics import register_metrics
from recbole_llmk.utils import get_model

# Settings with these prefixes are the plugin's: one that no property file defines is a typo.
PLUGIN_PREFIXES = ("reki_", "reland_", "learn_", "llm_", "knowledge_", "hein_", "encoder_")


@lru_cache(maxsize=None)
def plugin_keys():
    """Every setting the plugin's property files define (each has a default there); read once
    per process (every Config, the knowledge models' derived ones too, asks)."""
    keys = set()
    for file in glob.glob(os.path.join(PROPERTIES, "**", "*.yaml"), recursive=True):
        with open(file, encoding="utf-8") as f:
            keys.update(yaml.safe_load(f) or {})
    return frozenset(keys)


def unknown_setting_warnings(names):
    """A warning for each of ``names`` that has a plugin prefix and no default anywhere."""
    known = plugin_keys()
    warnings = []
    for name in sorted(names):
        if name.startswith(PLUGIN_PREFIXES) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            warnings.append(f"{name} is not a recbole-llmk setting and is ignored"
                            + (f": did you mean {close[0]}?" if close else "")
                            + " (every setting is in recbole_llmk/properties/)")
    return warnings


def choices():
    """Settings that name one of a fixed set of things, and that set (``None``: may be left empty)."""
    from recbole_llmk.distributed import BACKENDS
    from recbole_llmk.knowledge.controls import CONTROLS
    from recbole_llmk.model.layers import FUSIONS, PRECISIONS
    from recbole_llmk.techniques.reland import RETRIEVALS

    return {"knowledge_control": (None, *CONTROLS), "reland_user_fusion": tuple(FUSIONS),
            "reland_item_fusion": tuple(FUSIONS), "hein_fusion": tuple(FUSIONS), "reland_retrieval": RETRIEVALS,
            "distributed_backend": (None, *BACKENDS), "knowledge_vector_dtype": ("float32", "float16"),
            "hein_precision": tuple(PRECISIONS)}


def check_choices(settings):
    """Refuse a value outside its set (or a knowledge norm that is no positive number) at once, not
    after minutes of knowledge building."""
    for name, allowed in choices().items():
        if name in settings and settings[name] not in allowed:
            shown = " | ".join("~" if a is None else a for a in allowed)
            raise ValueError(f"{name}: '{settings[name]}' is not one of {shown} (recbole_llmk/properties/ documents each)")
    from recbole_llmk.techniques.reland import check_knowledge_norm

    check_knowledge_norm(settings.get("reland_knowledge_norm"))


def plugin_property_files(model_name, techniques, dataset):
    names = ["overall.yaml"] + [os.path.join("technique", f"{t}.yaml") for t in techniques]
    names += [os.path.join("model", f"{model_name}.yaml"), os.path.join("dataset", f"{dataset}.yaml")]
    return [os.path.join(PROPERTIES, n) for n in names]


class LLMKConfig(Config):
    """Config for stock RecBole models and their knowledge-augmented variants."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        check_stack()
        register_metrics()  # UAUC, WUAUC: RecBole checks metric names while building the config
        super().__init__(model, dataset, config_file_list, config_dict)
        # Logged by quick_start once the run's log exists (RecBole's logger is set up after this).
        self.startup_warnings = unknown_setting_warnings(self.external_config_dict)
        check_choices(self.final_config_dict)

    def _load_cmd_line(self):
        """RecBole's reader of ``--key=value``, but the value may hold "=" (a URL with a query):
        RecBole drops such an argument, and the run would fall back to the default (OpenAI's own
        endpoint, for ``--llm_base_url``)."""
        values, unrecognized = {}, []
        for arg in sys.argv[1:] if "ipykernel_launcher" not in sys.argv[0] else []:
            name, has_value, value = arg[2:].partition("=")
            if not arg.startswith("--") or not has_value or not name:
                unrecognized.append(arg)
                continue
            if name in values and values[name] != value:
                raise SyntaxError(f"There are duplicate command arg '{arg}' with different value.")
            values[name] = value
        if unrecognized:
            logging.getLogger().warning(f"command line args [{' '.join(unrecognized)}] will not be used in RecBole")
        return self._convert_config_dict(values)

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if isinstance(model, str):
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        base = getattr(model_class, "base_model_name", model)
        super()._load_internal_config_dict(base, model_class, dataset)
        technique = getattr(model_class, "technique", None)
        techniques = getattr(model_class, "techniques", (technique,) if technique else ())
        for file in plugin_property_files(model, techniques, dataset):
            if os.path.isfile(file):
                self._update_internal_config_dict(file)
        self.internal_config_dict["base_model"] = base
        self.internal_config_dict["technique"] = technique

    def _init_device(self):
        """RecBole's, but a distributed run joins with gloo on CPUs (RecBole's is NCCL, GPUs only)."""
        if "local_rank" in self.final_config_dict and backend_of(self.final_config_dict) == "gloo":
            join_on_cpu(self.final_config_dict)
        else:
            super()._init_device()

    def _set_default_parameters(self):
        super()._set_default_parameters()
        self.final_config_dict["data_path"] = atomic_files_folder(self.final_config_dict["data_path"], self.dataset)


def atomic_files_folder(path, dataset):
    """RecBole reads ``<data_path>/<dataset>/<dataset>.inter``; also accept a ``data_path`` that holds
    ``<dataset>.inter`` itself (a folder named otherwise, e.g. ../shared/data/amazon-beauty/recbole)."""
    parent = os.path.dirname(os.path.normpath(path))
    if not os.path.isdir(path) and os.path.isfile(os.path.join(parent, f"{dataset}.inter")):
        return parent
    return path
