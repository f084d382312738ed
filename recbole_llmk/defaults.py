"""The plugin's defaults: its property files (``recbole_llmk/properties``), read, never retyped.

A RecBole Config already holds them (``LLMKConfig`` layers the files). Code that may also be
handed a plain dict (a notebook, a test, a derived config) reads a setting through ``setting``,
which falls back to the same files for a missing or empty (``~``) key, so a default lives in one
place and a valid ``0`` or ``False`` stays what the user wrote.
"""

import glob
import os
from functools import lru_cache

import yaml

PROPERTIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "properties")


@lru_cache(maxsize=None)
def plugin_defaults():
    """Every plugin setting's default: ``overall.yaml`` and the techniques' files (a model's file,
    e.g. ``model/LEARN.yaml``, adds its own model's settings and RecBole's, read by that model only)."""
    defaults = {}
    for path in [os.path.join(PROPERTIES, "overall.yaml"), *sorted(glob.glob(os.path.join(PROPERTIES, "technique", "*.yaml")))]:
        with open(path, encoding="utf-8") as f:
            defaults.update(yaml.safe_load(f) or {})
    return defaults


def setting(config, key):
    """``config[key]`` when ``config`` gives it a value (``0`` and ``False`` included), else (missing
    or ``~``, as RecBole reads an unset key) its default from the property files."""
    if key in config and config[key] is not None:
        return config[key]
    defaults = plugin_defaults()
    if key not in defaults:
        raise KeyError(f"{key} is neither in the config nor a recbole-llmk setting with a default")
    return defaults[key]
