"""RecBole 1.2.1's own model tests, through the plugin, on RecBole's own test data as it is: one
model of every family per technique, and composed techniques (the full sweep, every model x every
technique, is ``benchmarks/recbole_model_tests.py``; its table is docs/coverage.md's "trained").
The tests and data are read from ../shared/data/recbole-tests (RecBole's repository carries them,
its wheel does not); without them these tests skip."""

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
from recbole_model_tests import SHARED, YAML, recbole_tests, run_config, run_one  # noqa: E402

SOURCE = os.path.join(SHARED, "model", "test_model_auto.py")
pytestmark = pytest.mark.skipif(not os.path.isfile(SOURCE), reason=f"RecBole's model tests are not at {SOURCE} "
                                                                   "(../shared/data/recbole-tests)")

# (RecBole model, suffix): general, sequential, context-aware and deep-interest models, each technique
# where it serves the family, and two compositions.
CASES = [("BPR", "REKI"), ("BPR", "ReLand"), ("SASRec", "REKI"), ("SASRec", "ReLand"), ("SASRec", "LEARN"),
         ("DeepFM", "REKI"), ("DIN", "LEARN"), ("BPR", "ReLand_REKI"), ("DIN", "REKI_LEARN")]


@pytest.fixture(scope="module")
def configs():
    tests = {}
    for _, config in recbole_tests(SOURCE):
        tests.setdefault(config["model"], config)  # a model's first test
    return tests


def run_test(configs, tmp_path, model, variant, **changes):
    return run_one(variant, run_config(dict(configs[model], **changes), variant, str(tmp_path)), YAML, timeout=600)


@pytest.mark.parametrize("model, suffix", CASES)
def test_recbole_s_own_model_test_passes_through_the_plugin(configs, tmp_path, model, suffix):
    record = run_test(configs, tmp_path, model, f"{model}_{suffix}")
    assert record["status"] == "passed", record.get("trace") or record.get("error")
    assert record["test_result"]


def test_a_general_model_s_learn_features_refuse_its_random_split_and_say_which_split_works(configs, tmp_path):
    """RecBole's general-model tests split at random; LEARN is sequential and must train on the run's
    own split, so BPR_LEARN refuses it, naming a time-ordered split with the run's evaluation mode,
    and passes with that split."""
    refused = run_test(configs, tmp_path, "BPR", "BPR_LEARN")
    assert refused["status"] == "failed" and "needs a time-ordered one" in refused["error"]
    ordered = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
               "mode": configs["BPR"].get("eval_args", {}).get("mode") or {"valid": "full", "test": "full"}}
    assert f'--eval_args="{ordered}"' in refused["trace"]  # RecBole's test's own mode kept
    record = run_test(configs, tmp_path, "BPR", "BPR_LEARN", eval_args=ordered)
    assert record["status"] == "passed", record.get("trace") or record.get("error")
