"""Variants see RecBole exactly as their stock base model does; the CLI works RecBole-style."""

import os
import subprocess
import sys

import pytest
import yaml
from recbole.config import Config
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.trainer import Trainer
from recbole.utils import get_model as recbole_get_model
from recbole.utils import init_seed

from recbole_llmk.config import LLMKConfig, PROPERTIES
from recbole_llmk.quick_start import run_recbole_llmk
from recbole_llmk.utils import create_dataset, get_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plugin_keys():
    keys = {"base_model", "technique", "model"}
    for folder, _, files in os.walk(PROPERTIES):
        for name in files:
            with open(os.path.join(folder, name)) as f:
                keys |= set(yaml.safe_load(f) or {})
    return keys


@pytest.mark.parametrize("base,dataset", [("DIN", "ml-100k"), ("DIEN", "ml-100k"), ("DeepFM", "ml-100k"), ("DIN", "tiny")])
def test_variant_config_equals_stock_config_plus_plugin_keys(base, dataset, workdir):
    cfg = {"data_path": str(workdir / "data")}
    stock = Config(base, dataset, config_dict=cfg).final_config_dict
    variant = LLMKConfig(f"{base}_REKI", dataset, config_dict=cfg).final_config_dict
    ignored = plugin_keys() | {"MODEL_INPUT_TYPE"}
    assert {k: v for k, v in variant.items() if k not in ignored} == {k: v for k, v in stock.items() if k not in ignored}
    assert variant["MODEL_INPUT_TYPE"] == stock["MODEL_INPUT_TYPE"]
    assert variant["base_model"] == base and variant["model"] == f"{base}_REKI"
    if base in ("DIN", "DIEN"):
        assert variant["metrics"] == ["AUC", "LogLoss"]  # RecBole's DIN/DIEN quick-start settings


def test_dien_variant_gets_diens_dataset_and_trainer(workdir):
    config = LLMKConfig("DIEN_REKI", "tiny", config_dict={"data_path": str(workdir / "data"), "state": "WARNING"})
    assert type(create_dataset(config)).__name__ == "DIENDataset"
    assert config["model"] == "DIEN_REKI"  # restored after the lookup
    assert issubclass(get_trainer(config), Trainer)


def test_stock_model_through_plugin_matches_recbole(tiny_config):
    """Same seed, same data: the plugin's quick start gives RecBole's own numbers for a stock model."""
    tiny_config["epochs"] = 2
    ours = run_recbole_llmk("DeepFM", "tiny", config_dict=dict(tiny_config), saved=False)["test_result"]

    config = Config("DeepFM", "tiny", config_dict=dict(tiny_config))
    init_seed(config["seed"], config["reproducibility"])
    dataset = recbole_create_dataset(config)
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = recbole_get_model("DeepFM")(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    theirs = trainer.evaluate(test_data, load_best_model=False)
    assert dict(ours) == dict(theirs)


def test_anomaly_detection_is_off_and_changes_no_number(tiny_config):
    """Importing RecBole's sequential models (DIN among them) runs sine.py's process-wide
    ``set_detect_anomaly(True)``; the plugin turns it off (``detect_anomaly``), which only saves
    time: with it on, as RecBole leaves it, DIN trains to the same weights."""
    import torch

    tiny_config["epochs"] = 2
    try:
        fast = run_recbole_llmk("DIN", "tiny", config_dict=dict(tiny_config), saved=False)
        assert not torch.is_anomaly_enabled()
        slow = run_recbole_llmk("DIN", "tiny", config_dict=dict(tiny_config, detect_anomaly=True), saved=False)
        assert torch.is_anomaly_enabled()
    finally:
        torch.autograd.set_detect_anomaly(False)
    assert dict(fast["test_result"]) == dict(slow["test_result"])
    assert all(torch.equal(a, b) for a, b in zip(fast["model"].parameters(), slow["model"].parameters()))


def test_flush_denormal_is_the_configs_choice(tiny_config):
    import torch

    from recbole_llmk.quick_start import prepare

    denormal = torch.tensor([1e-39])
    try:
        prepare("DeepFM", "tiny", config_dict=dict(tiny_config, flush_denormal=True))
        assert (denormal * 1.0).item() == 0.0
        prepare("DeepFM", "tiny", config_dict=dict(tiny_config))
        assert (denormal * 1.0).item() > 0.0
    finally:
        torch.set_flush_denormal(False)


FAULTS_PER_ALLOCATION = """
import resource, sys, torch
from recbole_llmk.compat import set_process_modes
set_process_modes({"detect_anomaly": False, "flush_denormal": False, "keep_freed_memory": sys.argv[1] == "True"})
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # a DIN-step-sized tensor (64 MiB), freed at once
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_page_faults_per_allocation():
    """glibc hands blocks above 32 MiB back to the kernel on free, so every large tensor is
    faulted in page by page again; ``keep_freed_memory`` has the process reuse them."""
    from recbole_llmk.compat import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: its allocator has no mallopt")
    faults = {keep: sorted(map(int, subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION, str(keep)], check=True,
                                                   capture_output=True, text=True).stdout.split()))
              for keep in (True, False)}
    # The median, not the sum: the first few blocks are fresh pages either way while the heap
    # grows, and how many that takes differs between machines (two here, three on CI).
    kept, freed = faults[True][6], faults[False][6]
    assert freed > 1000, faults  # 64 MiB of fresh pages per allocation
    assert kept < freed / 20, faults


def test_unknown_model_gives_a_clear_error(workdir):
    with pytest.raises(ValueError, match="is not a RecBole model"):
        LLMKConfig("NoSuchModel_REKI", "tiny", config_dict={"data_path": str(workdir / "data")})


def test_a_broken_install_is_not_called_an_unknown_model(monkeypatch):
    from recbole_llmk import utils

    def scipy_for_numpy_2(name):  # what RecBole's lookup met on a machine whose scipy needs numpy 2
        raise AttributeError("module 'numpy' has no attribute 'long'")

    monkeypatch.setattr(utils, "recbole_get_model", scipy_for_numpy_2)
    with pytest.raises(ImportError, match=r"looking up \[DIN\]: AttributeError: .*'long'.*reinstall"):
        utils.get_recbole_model("DIN")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="is not a RecBole model"):  # RecBole's lightgbm ImportError still is one
        utils.get_recbole_model("NoSuchModel")


def test_command_line_overrides_and_config_files(tiny_config, workdir):
    config_file = workdir / "run.yaml"
    config_file.write_text(yaml.safe_dump({k: v for k, v in tiny_config.items() if k != "epochs"}))
    command = [sys.executable, os.path.join(ROOT, "run_recbole_llmk.py"), "--model=DeepFM_REKI", "--dataset=tiny",
               f"--config_files={config_file}", "--epochs=1", "--hein_n_shared=1", "--state=INFO"]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))))
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "test result" in log and "auc" in log
    assert "hein_n_shared = 1" in log  # --key=value reached the config


def test_package_data_ships_every_yaml_and_template():
    """An installed package (not only the checkout) must carry the yaml defaults, hooks and prompts."""
    import configparser
    from fnmatch import fnmatch
    from pathlib import Path

    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    patterns = setup["options.package_data"]["recbole_llmk"].split()
    package = Path(ROOT) / "recbole_llmk"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*") if p.suffix in (".yaml", ".txt")]
    assert data and all(any(fnmatch(f, pattern) for pattern in patterns) for f in data), data


def test_data_path_may_hold_the_atomic_files_itself(workdir):
    """A folder not named after the dataset (../shared/data/amazon-beauty/recbole) works as data_path."""
    folder = str(workdir / "data" / "tiny")
    config = LLMKConfig("DeepFM", "tiny", config_dict={"data_path": folder, "state": "WARNING"})
    assert os.path.samefile(config["data_path"], folder)
    config = LLMKConfig("DeepFM", "tiny", config_dict={"data_path": str(workdir / "data"), "state": "WARNING"})
    assert os.path.samefile(config["data_path"], folder)


def test_two_runs_starting_at_once_in_one_folder_both_start(tiny_config, monkeypatch):
    """RecBole makes ./log/<model> and checkpoint_dir by "if missing: makedirs". Here a rival run
    creates each folder between that check and that call, as two benchmark cells started together
    did; the run must still start, log and train."""
    import recbole.trainer.trainer
    import recbole.utils.logger

    def ensure_dir_with_a_rival(path):
        if not os.path.exists(path):
            os.makedirs(path)  # the rival run, just after the check
            os.makedirs(path)  # RecBole's own call

    monkeypatch.setattr(recbole.utils.logger, "ensure_dir", ensure_dir_with_a_rival)
    monkeypatch.setattr(recbole.trainer.trainer, "ensure_dir", ensure_dir_with_a_rival)
    result = run_recbole_llmk("DeepFM", "tiny", config_dict=dict(tiny_config, epochs=1))
    assert result["test_result"]["auc"] > 0
    assert os.listdir(os.path.join("log", "DeepFM"))
