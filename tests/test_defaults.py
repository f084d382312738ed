"""Defaults live in the property files only; a valid 0 or False stays what the user wrote."""

import glob
import os
import re

import pytest

from recbole_llmk.config import LLMKConfig
from recbole_llmk.defaults import plugin_defaults, setting
from recbole_llmk.knowledge.generation import LLMSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_plain_dict_gets_the_yaml_default_and_a_config_keeps_a_zero(workdir):
    assert setting({}, "history_length") == plugin_defaults()["history_length"] == 15
    assert setting({"history_length": 0}, "history_length") == 0
    assert setting({"history_length": None}, "history_length") == 15  # ~ in a yaml: unset, as RecBole reads it
    config = LLMKConfig("BPR_REKI", "ml-100k", config_dict={"history_length": 0, "learn_features_epochs": 0,
                                                            "reki_like_threshold": 0})
    assert [setting(config, k) for k in ("history_length", "learn_features_epochs", "reki_like_threshold")] == [0, 0, 0]
    with pytest.raises(KeyError, match="not_a_setting"):
        setting({}, "not_a_setting")


def test_the_llm_settings_defaults_are_the_yaml_ones():
    settings = LLMSettings.from_config({})
    defaults = plugin_defaults()
    assert settings.concurrency == defaults["llm_concurrency"] and settings.max_tokens == defaults["llm_max_tokens"]
    assert settings.on_bad_answer == defaults["llm_on_bad_answer"] and settings.device == "cpu"


def test_no_plugin_default_is_retyped_in_the_code():
    """``config["history_length"] or 15`` turned a valid 0 into 15; such reads go through ``setting``."""
    defaults = plugin_defaults()
    retyped = []
    for path in glob.glob(os.path.join(ROOT, "recbole_llmk", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                for key in re.findall(r"config\[[\"'](\w+)[\"']\] or ", line):
                    if key in defaults and defaults[key] is not None:
                        retyped.append(f"{os.path.relpath(path, ROOT)}:{number}: {key}")
    assert not retyped, retyped
