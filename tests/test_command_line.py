"""What a user types on the command line: values with '=', typos, and secrets that must never
reach a log. Each test runs ``run_recbole_llmk.py`` in its own process, as a user does (RecBole
sets up its log files only in a process whose logging nobody configured yet)."""

import glob
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_server import LLMTestServer

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-query-SECRET-0123456789"


@pytest.fixture
def server():
    with LLMTestServer() as running:
        yield running


def run_cli(workdir, config, *argv):
    """Run the entry script on the tiny dataset (settings in a yaml file); -> its output and log."""
    config_file = workdir / "run.yaml"
    config_file.write_text(yaml.safe_dump(dict(config, state="INFO")))
    done = subprocess.run([sys.executable, str(REPO / "run_recbole_llmk.py"), "--model=DeepFM_REKI", "--dataset=tiny",
                           f"--config_files={config_file}", "--run=knowledge", *argv],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = "".join(Path(p).read_text() for p in glob.glob(str(workdir / "log" / "**" / "*.log"), recursive=True))
    assert logs, "RecBole wrote no log file"
    return done.stdout + done.stderr + logs


def test_a_url_with_a_query_is_used_and_its_credential_never_logged(tiny_config, server, workdir):
    url = f"http://user:hunter2pass@127.0.0.1:{server.port}/v1?api-key={SECRET}"
    output = run_cli(workdir, tiny_config, f"--llm_base_url={url}", "--llm_backend=openai", "--llm_model=test-model")
    # RecBole's own reader drops '--key=a=b' with a warning: the run then asked OpenAI's own endpoint.
    assert server.received == 70 and all(f"?api-key={SECRET}" in path for path in server.paths)
    assert f"llm_base_url = http://127.0.0.1:{server.port}/v1" in output  # the config dump, redacted
    assert SECRET not in output and "hunter2pass" not in output
    assert "HTTP Request" not in output  # no INFO line per request (2,625 in an ml-100k build)


def test_a_mistyped_setting_is_named_with_the_nearest_one(tiny_config, workdir):
    output = run_cli(workdir, tiny_config, "--reki_top_dd=3", "--history_length=5")
    assert "reki_top_dd is not a recbole-llmk setting and is ignored: did you mean reki_top_d?" in output
    assert "history_length is not" not in output  # RecBole's and unprefixed keys are not judged


def test_a_run_leaves_its_results_beside_its_log(tiny_config, workdir):
    import json

    config_file = workdir / "run.yaml"
    config_file.write_text(yaml.safe_dump(dict(tiny_config, state="INFO")))
    done = subprocess.run([sys.executable, str(REPO / "run_recbole_llmk.py"), "--model=DeepFM_REKI", "--dataset=tiny",
                           f"--config_files={config_file}"], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = glob.glob(str(workdir / "log" / "**" / "*.json"), recursive=True)
    assert len(results) == 1 and Path(results[0]).with_suffix(".log").is_file()
    saved = json.loads(Path(results[0]).read_text())
    assert saved["model"] == "DeepFM_REKI" and saved["dataset"] == "tiny" and saved["seed"] == 2020
    assert set(saved["test_result"]) == {"auc", "logloss"} and saved["knowledge_store"]
    import recbole_llmk

    assert saved["recbole_llmk"] == recbole_llmk.__version__ != "0+unknown"
