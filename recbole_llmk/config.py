"""RecBole's Config, resolving this plugin's models and layering its yaml defaults.

Precedence, lowest first: RecBole's own defaults for the *base* model (its model yaml, dataset
yaml and quick-start settings such as DIN's labeled AUC evaluation) < the plugin's
``properties/overall.yaml`` < ``properties/technique/<Technique>.yaml`` <
``properties/model/<Model>.yaml`` < ``properties/dataset/<dataset>.yaml`` < the user's config
files < config dict < command line (``--key=value``), exactly as in RecBole.
"""

import os

from recbole.config import Config

from recbole_llmk.compat import check_stack
from recbole_llmk.metrics import register_metrics
from recbole_llmk.utils import get_model

PROPERTIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "properties")


def plugin_property_files(model_name, technique, dataset):
    names = ["overall.yaml"]
    if technique:
        names.append(os.path.join("technique", f"{technique}.yaml"))
    names += [os.path.join("model", f"{model_name}.yaml"), os.path.join("dataset", f"{dataset}.yaml")]
    return [os.path.join(PROPERTIES, n) for n in names]


class LLMKConfig(Config):
    """Config for stock RecBole models and their knowledge-augmented variants."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        check_stack()
        register_metrics()  # UAUC, WUAUC: RecBole checks metric names while building the config
        super().__init__(model, dataset, config_file_list, config_dict)

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
        for file in plugin_property_files(model, technique, dataset):
            if os.path.isfile(file):
                self._update_internal_config_dict(file)
        self.internal_config_dict["base_model"] = base
        self.internal_config_dict["technique"] = technique

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
