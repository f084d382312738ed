"""The benchmark harness itself (not a benchmark): cells, resume, statistics, reports."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import run_suite  # noqa: E402
import valid_test_curves  # noqa: E402
from harness import plots, reports, schema, staleness, statistics  # noqa: E402
from harness import users as harness_users  # noqa: E402


def test_suite_runs_reports_and_resumes(tiny_config, workdir):
    config = {k: v for k, v in tiny_config.items() if k not in ("seed", "show_progress")}
    suite = {"dataset": "tiny", "models": ["DeepFM", {"label": "DeepFM_REKI/all", "model": "DeepFM_REKI"}],
             "seeds": [1, 2], "config": config}
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "run_suite.py"), str(path), "--results", str(workdir / "results")]
    first = subprocess.run(command + ["--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = workdir / "results" / "suite"
    cells = sorted(os.listdir(folder / "cells"))
    assert cells == ["DeepFM-1.json", "DeepFM-2.json", "DeepFM_REKI_all-1.json", "DeepFM_REKI_all-2.json"]
    with open(folder / "summary.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"DeepFM", "DeepFM_REKI/all"}
    assert rows["DeepFM_REKI/all"]["auc_p"] != "" and rows["DeepFM"]["auc_p"] == ""
    assert float(rows["DeepFM_REKI/all"]["infer_batch_ms_prestored"]) > 0
    assert float(rows["DeepFM_REKI/all"]["llm_prompts"]) == 30 + 40 and float(rows["DeepFM_REKI/all"]["llm_calls"]) == 0
    summary = (folder / "summary.md").read_text()
    assert "| DeepFM_REKI/all | 2 |" in summary
    cell = json.loads((folder / "cells" / "DeepFM_REKI_all-1.json").read_text())
    made = cell["provenance"]  # which code, libraries, threads and device produced the cell
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert made["commit"] == head and isinstance(made["code_changed"], bool)
    assert made["versions"]["recbole"] == "1.2.1" and made["threads"] == 1 and made["device"] == "cpu"
    assert made["store"].startswith("REKI-none-") and made["wall_seconds"] > 0
    assert "4 cells ran" in summary and "load average at the end of 4 of 4 cells" in summary
    assert first.stdout.count("knowledge ready after") == 2  # the REKI cells', not the stock ones'
    assert not [f for f in os.listdir(folder / "claims") if f.endswith(".out")]  # a finished cell's output goes
    assert (folder / "uplift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamps = {c: os.path.getmtime(folder / "cells" / c) for c in cells}
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier, skipped") == 4
    assert "no cell ran in this invocation" in (folder / "summary.md").read_text()
    assert stamps == {c: os.path.getmtime(folder / "cells" / c) for c in cells}


def test_test_curves_record_every_validation_and_leave_the_cell_as_it_was(tiny_ranking_config, workdir):
    """Scoring the test split after each validation changes no number of the run: the curve's
    run ends with the suite cell's own test result (``matches_suite_cell`` compares them), and its
    users' values average to that result."""
    config = {k: v for k, v in tiny_ranking_config.items() if k not in ("seed", "show_progress")}
    config.update(epochs=3, eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"})
    suite = {"dataset": "tiny", "models": ["BPR", "BPR_REKI"], "seeds": [1], "config": config}
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    results = ["--results", str(workdir / "results")]
    cell = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_suite.py"), str(path), "--only", "BPR_REKI"]
                          + results, capture_output=True, text=True, timeout=600)
    assert cell.returncode == 0, cell.stderr[-3000:]
    # the cell's test users, beside it; removed, as for a cell run before they were recorded
    users_path = workdir / "results" / "suite" / "users" / "BPR_REKI-1.csv.gz"
    first = harness_users.read_users(str(users_path))
    users_path.unlink()
    curves = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "valid_test_curves.py"), str(path)] + results,
                            capture_output=True, text=True, timeout=600)
    assert curves.returncode == 0, curves.stderr[-3000:]
    folder = workdir / "results" / "suite" / "curves"
    run = json.loads((folder / "BPR_REKI-1.json").read_text())
    assert [point["epoch"] for point in run["curve"]] == [0, 1, 2] and run["valid_metric"] == "ndcg@10"
    chosen = valid_test_curves.chosen(run)  # the epoch RecBole's early stop kept
    assert chosen["test"] == run["test"] and chosen["valid_score"] == run["valid"]["ndcg@10"]
    assert run["matches_suite_cell"] is True
    users = run["per_user_test"]
    assert len(users) > 10 and abs(sum(users) / len(users) - run["test"]["ndcg@10"]) < 1e-4
    # the suite's cell had recorded the same test users (users/), each with every top-k metric, and
    # the curve's run, the same as the cell, wrote them back
    recorded = harness_users.read_users(str(users_path))
    assert recorded == first and recorded["ndcg@10"] == users and len(set(recorded["user"])) == len(users)
    assert not (workdir / "results" / "suite" / "users" / "BPR-1.csv.gz").exists()  # no suite cell of it
    cell = json.loads((workdir / "results" / "suite" / "cells" / "BPR_REKI-1.json").read_text())
    assert "per_user_test" not in cell and harness_users.cell_users(str(workdir / "results" / "suite"), cell) == recorded
    assert abs(sum(recorded["hit@10"]) / len(users) - cell["test"]["hit@10"]) < 6e-5
    stock = json.loads((folder / "BPR-1.json").read_text())
    assert stock["matches_suite_cell"] is None and len(stock["per_user_test"]) == len(users)
    row = next(line for line in curves.stdout.splitlines() if line.startswith("| BPR_REKI |"))
    assert row.startswith("| BPR_REKI | 1 | 3 |") and " % ± " in row
    from_cells = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "valid_test_curves.py"), str(path),
                                 "--cells"] + results, capture_output=True, text=True, timeout=600)
    valid, test = run["valid"]["ndcg@10"], run["test"]["ndcg@10"]
    assert f"| BPR_REKI | 1 | ndcg@10 | {valid:.4f} | {test:.4f} | {test / valid:.3f} |" in from_cells.stdout


def test_stores_only_builds_the_knowledge_and_trains_nothing(tiny_config, workdir):
    """Stores built ahead (where the encoder is) are what the cells then use, unchanged."""
    config = {k: v for k, v in tiny_config.items() if k not in ("seed", "show_progress")}
    suite = {"dataset": "tiny", "models": ["DeepFM", "DeepFM_REKI"], "seeds": [1], "config": config}
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "run_suite.py"), str(path), "--results", str(workdir / "results")]
    ahead = subprocess.run(command + ["--stores-only"], capture_output=True, text=True, timeout=600)
    assert ahead.returncode == 0, ahead.stderr[-3000:]
    folder = workdir / "results" / "suite"
    assert os.listdir(folder / "cells") == [] and not (folder / "summary.md").exists()
    built = json.loads((folder / "stores" / "DeepFM_REKI-1.json").read_text())
    assert json.loads((folder / "stores" / "DeepFM-1.json").read_text())["store"] is None
    assert not (folder / "log" / "DeepFM").exists()  # the stock cell loaded no dataset (RecBole logs it)
    meta = os.path.join(built["store"], "meta.json")
    stamp = os.path.getmtime(meta)
    trained = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert sorted(os.listdir(folder / "cells")) == ["DeepFM-1.json", "DeepFM_REKI-1.json"]
    assert os.path.getmtime(meta) == stamp  # used as built, not rebuilt


def test_a_cell_claimed_by_another_runner_is_left_to_it(tiny_config, workdir):
    """Runners started side by side on one suite run each cell once: a held cell is skipped."""
    config = {k: v for k, v in tiny_config.items() if k not in ("seed", "show_progress")}
    suite = {"dataset": "tiny", "models": ["DeepFM"], "seeds": [1, 2], "config": config}
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    folder = workdir / "results" / "suite"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "run_suite.py"), str(path), "--results", str(workdir / "results")]
    with run_suite.claim(str(folder), "DeepFM", 1, "cells") as held:
        with run_suite.claim(str(folder), "DeepFM", 1, "cells") as again:
            assert held and not again  # a second claim fails while the first is held
        other = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "DeepFM seed 1: another runner has it, skipped" in other.stdout
    assert sorted(os.listdir(folder / "cells")) == ["DeepFM-2.json"]
    assert "1 cell ran" in (folder / "summary.md").read_text()
    with run_suite.claim(str(folder), "DeepFM", 1, "cells") as free:
        assert free  # the runner's claims ended with it


def test_a_cell_whose_settings_the_suite_changed_is_set_aside_and_run_again(tiny_config, workdir):
    """A suite edited after a cell ran must not keep reporting the old run as if it were the new."""
    config = {k: v for k, v in tiny_config.items() if k not in ("seed", "show_progress")}
    path = workdir / "suite.yaml"
    folder = workdir / "results" / "suite"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "run_suite.py"), str(path), "--results", str(workdir / "results")]

    def run(*extra, **changes):
        path.write_text(yaml.safe_dump({"dataset": "tiny", "models": ["DeepFM"], "seeds": [1], "config": {**config, **changes}}))
        return subprocess.run(command + list(extra), capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    cell = json.loads((folder / "cells" / "DeepFM-1.json").read_text())
    assert cell["settings"] == {**config, "seed": 1, "show_progress": False}
    # where files go, and what only a technique reads, leave a stock model's run as it was
    same = run(checkpoint_dir=str(workdir / "elsewhere"), reki_release_path="x", reland_seed_ratio=0.5)
    assert "done earlier, skipped" in same.stdout, same.stdout
    assert staleness.run_differences("DeepFM_REKI", cell["settings"], {**cell["settings"], "reki_release_path": "x"}) == ["reki_release_path"]

    summary = run("--summary-only", learning_rate=0.01)
    assert summary.returncode != 0 and "no finished cells" in summary.stderr and "1 ran under other settings" in summary.stderr
    again = run(learning_rate=0.01)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done earlier under other settings (learning_rate), set aside as stale/" in again.stdout
    (old,) = os.listdir(folder / "stale")
    assert json.loads((folder / "stale" / old).read_text()) == cell  # kept, out of the summary
    assert json.loads((folder / "cells" / "DeepFM-1.json").read_text())["settings"]["learning_rate"] == 0.01

    stale = {"DeepFM-1": staleness.run_differences("DeepFM", {**cell["settings"], "epochs": 2}, cell["settings"])}
    report = reports.write_reports(schema.load_suite(str(path)), [], str(folder), 1.0, 1, 0, [], stale)
    assert "left out: 1 cell run under settings the suite has changed since (DeepFM-1: epochs; rerun them)" in report


def test_a_failed_cell_keeps_its_output_and_the_runner_says_where(tiny_config, workdir):
    config = {k: v for k, v in tiny_config.items() if k not in ("seed", "show_progress")}
    suite = {"dataset": "tiny", "models": ["DeepFM"], "seeds": [1], "config": dict(config, knowledge_control="no-such-control")}
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "run_suite.py"), str(path), "--results", str(workdir / "results")]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "DeepFM seed 1 failed (exit 1" in failed.stderr
    console = re.search(r"its output: (\S+)\)", failed.stderr).group(1)
    assert "no-such-control" in open(console).read() and "no-such-control" in failed.stderr


def test_a_killed_cell_resumes_to_the_result_of_an_unbroken_one(tiny_config, workdir):
    import signal
    import time

    config = {k: v for k, v in tiny_config.items() if k not in ("seed", "show_progress")}
    config.update(epochs=8, stopping_step=8, eval_step=1, train_batch_size=32)
    suite = {"dataset": "tiny", "models": ["DeepFM"], "seeds": [1], "config": config}
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))

    def command(results):
        return [sys.executable, os.path.join(ROOT, "benchmarks", "run_suite.py"), str(path), "--results", str(workdir / results)]

    folder = workdir / "killed" / "suite"
    state = run_suite.resume_file_of(str(folder), "DeepFM", 1)
    runner = subprocess.Popen(command("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not os.path.isfile(state) and runner.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(runner.pid, signal.SIGKILL)  # the runner and its cell, as a closed session would
    runner.wait()
    assert os.path.isfile(state) and not (folder / "cells" / "DeepFM-1.json").exists()
    state_copy = workdir / "state.pth"
    shutil.copy(state, state_copy)

    resumed = subprocess.run(command("killed"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    saved_epochs = torch.load(state_copy, weights_only=True)["epoch"] + 1
    # the runner's bar starts after the saved epochs (they are not timed again); its last update is the 8th epoch's start, 7/8
    shown = re.findall(r"DeepFM seed 1: +\d+%\|[^|]*\| (\d+)/8 ", resumed.stderr)
    assert shown and int(shown[0]) == saved_epochs and shown[-1] == "7", resumed.stderr[-3000:]
    unbroken = subprocess.run(command("unbroken"), capture_output=True, text=True, timeout=600)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    cell = json.loads((folder / "cells" / "DeepFM-1.json").read_text())
    reference = json.loads((workdir / "unbroken" / "suite" / "cells" / "DeepFM-1.json").read_text())
    assert cell["resumed_after_epochs"] and "resumed_after_epochs" not in reference
    assert cell["epochs_run"] == reference["epochs_run"] == 8
    assert (cell["test"], cell["valid"]) == (reference["test"], reference["valid"])
    assert not os.path.exists(state) and os.listdir(config["checkpoint_dir"]) == []  # nothing left behind


def test_cost_quality_plot_needs_two_knowledge_entries(tmp_path):
    rows = [{"model": "DeepFM", "auc_mean": 0.78, "auc_std": 0.01},
            {"model": "individual", "auc_mean": 0.79, "auc_std": 0.01, "llm_prompts": 2625.0},
            {"model": "collective", "auc_mean": 0.785, "auc_std": 0.02, "llm_prompts": 45.0}]
    assert plots.plot_cost(rows[:2], "auc", str(tmp_path / "one.png")) is None
    path = plots.plot_cost(rows, "auc", str(tmp_path / "cost.png"))
    assert open(path, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    del rows[2]["auc_std"]  # an entry run on one seed has no spread
    path = plots.plot_cost(rows, "auc", str(tmp_path / "one-seed.png"))
    assert open(path, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_t_test_pairs_by_seed_and_matches_scipy():
    stock = {1: 0.70, 2: 0.72, 3: 0.71, 4: 0.69}
    variant = {3: 0.74, 1: 0.72, 4: 0.70, 2: 0.75}  # other order: pairing must follow the seed
    cells = [{"model": "DIN", "seed": s, "test": {"auc": v}} for s, v in stock.items()]
    cells += [{"model": "DIN_REKI", "seed": s, "test": {"auc": v}} for s, v in variant.items()]
    suite = {"models": ["DIN", "DIN_REKI"], "seeds": [1, 2, 3, 4]}
    row = {r["model"]: r for r in statistics.summarize(suite, cells)}["DIN_REKI"]
    seeds = sorted(stock)
    expected = stats.ttest_rel([variant[s] for s in seeds], [stock[s] for s in seeds]).pvalue
    assert row["auc_p"] == pytest.approx(expected, rel=1e-12)
    # by hand: differences 0.02, 0.03, 0.03, 0.01 -> mean 0.0225, sd 0.009574, t = 4.7001 on 3 df
    assert row["auc_p"] == pytest.approx(0.018220, abs=5e-6)
    assert row["auc_rel"] == pytest.approx((0.7275 - 0.705) / 0.705)
    assert statistics.relative_changes(cells, suite, "auc")["DIN_REKI"][0] == pytest.approx((0.72 - 0.70) / 0.70)


def test_sweep_entries_are_labelled_and_paired_with_their_stock_model():
    suite = {"models": ["DeepFM", {"label": "DeepFM_REKI-pca64", "model": "DeepFM_REKI",
                                   "config": {"knowledge_pca_dim": 64}}], "seeds": [1, 2], "config": {}, "model_config": {}}
    entry = schema.entries(suite)[1]
    assert entry["stock"] == "DeepFM"
    assert schema.cell_config(suite, entry, 1)["knowledge_pca_dim"] == 64
    cells = [{"model": "DeepFM", "seed": s, "test": {"auc": 0.70 + s / 100}} for s in (1, 2)]
    cells += [{"model": "DeepFM_REKI-pca64", "seed": s, "test": {"auc": v}} for s, v in ((1, 0.725), (2, 0.738))]
    rows = {r["model"]: r for r in statistics.summarize(suite, cells)}
    assert rows["DeepFM_REKI-pca64"]["auc_rel"] == pytest.approx((0.7315 - 0.715) / 0.715)


def test_a_variant_is_also_compared_with_the_entry_it_names(tmp_path):
    suite = {"name": "s", "dataset": "d", "seeds": [1, 2, 3], "models": [
        "DeepFM", {"label": "none", "model": "DeepFM_REKI"},
        {"label": "gpt", "model": "DeepFM_REKI", "versus": "none"}]}
    values = {"DeepFM": (0.70, 0.71, 0.72), "none": (0.72, 0.72, 0.74), "gpt": (0.73, 0.75, 0.74)}
    cells = [{"model": m, "seed": s, "test": {"auc": v}} for m, vs in values.items() for s, v in zip((1, 2, 3), vs)]
    rows = {r["model"]: r for r in statistics.summarize(suite, cells)}
    assert "versus" not in rows["none"] and rows["gpt"]["versus"] == "none"
    assert rows["gpt"]["auc_versus_rel"] == pytest.approx((0.74 - 0.7266667) / 0.7266667, rel=1e-5)
    assert rows["gpt"]["auc_versus_p"] == pytest.approx(stats.ttest_rel([0.73, 0.75, 0.74], [0.72, 0.72, 0.74]).pvalue)
    assert rows["gpt"]["auc_rel"] == pytest.approx((0.74 - 0.71) / 0.71)  # still against stock DeepFM
    report = reports.write_reports(suite, list(rows.values()), str(tmp_path), 1.0, 1, 9, cells)
    # the 95 % interval of the paired difference: differences 0.01, 0.03, 0.00 (mean 0.01333), t(0.975, 2)
    diff = np.array([0.01, 0.03, 0.0])
    half = stats.t.ppf(0.975, 2) * diff.std(ddof=1) / np.sqrt(3)
    low, high = (diff.mean() - half) / 0.7266667, (diff.mean() + half) / 0.7266667
    assert rows["gpt"]["auc_versus_ci"] == pytest.approx((low, high), rel=1e-4)
    assert (f"| gpt | none | {100 * rows['gpt']['auc_versus_rel']:+.2f}% (p={rows['gpt']['auc_versus_p']:.3f}, "
            f"95% CI {100 * low:+.2f} to {100 * high:+.2f}%) |") in report
    suite["models"][2]["versus"] = "non"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(suite))
    with pytest.raises(ValueError, match="typo.yaml.*'gpt'.*'non'"):
        schema.load_suite(str(tmp_path / "typo.yaml"))


def test_the_interval_over_test_users_pairs_them_user_by_user(tmp_path):
    """Each user's difference, averaged over the shared seeds; none where a users file disagrees
    with its cell (left by another run of it)."""
    rng = np.random.default_rng(0)
    folder = str(tmp_path)
    suite = {"name": "s", "dataset": "d", "seeds": [1, 2], "models": ["BPR", "BPR_REKI"]}
    tokens = [str(u) for u in range(1, 401)]
    values, cells = {}, []
    for model, lift in (("BPR", 0.0), ("BPR_REKI", 0.02)):
        for seed in (1, 2):
            ndcg = np.round(np.clip(rng.random(400) * 0.3 + lift * rng.random(400), 0, 1), 5)
            values[model, seed] = ndcg
            cell = {"model": model, "seed": seed, "test": {"ndcg@10": round(float(ndcg.mean()), 4)}}
            harness_users.write_users(harness_users.users_file(schema.cell_file(folder, model, seed)),
                                      {"user": tokens, "ndcg@10": list(ndcg)})
            cells.append(cell)
    rows = {r["model"]: r for r in statistics.summarize(suite, cells, lambda c: harness_users.cell_users(folder, c))}
    difference = np.mean([values["BPR_REKI", s] - values["BPR", s] for s in (1, 2)], axis=0)
    base = np.mean([values["BPR", s].mean() for s in (1, 2)])
    half = 1.959964 * difference.std(ddof=1) / np.sqrt(400)
    expected = ((difference.mean() - half) / base, (difference.mean() + half) / base)
    assert rows["BPR_REKI"]["ndcg@10_users_ci"] == pytest.approx(expected, rel=1e-5)
    report = reports.write_reports(suite, list(rows.values()), folder, 1.0, 1, 4, cells)
    assert f"; users' 95% CI {100 * expected[0]:+.2f} to {100 * expected[1]:+.2f}%)" in report
    assert "interval over the test users" in report
    # the same values give the same bytes (a rerun leaves git nothing to show)
    path = harness_users.users_file(schema.cell_file(folder, "BPR", 1))
    before = open(path, "rb").read()
    harness_users.write_users(path, {"user": tokens, "ndcg@10": list(values["BPR", 1])})
    assert open(path, "rb").read() == before
    # a users file that does not average to its cell's result is not the cell's: no interval
    harness_users.write_users(path, {"user": tokens, "ndcg@10": list(values["BPR", 1] + 0.001)})
    assert harness_users.cell_users(folder, cells[0]) is None
    rows = {r["model"]: r for r in statistics.summarize(suite, cells, lambda c: harness_users.cell_users(folder, c))}
    assert "ndcg@10_users_ci" not in rows["BPR_REKI"] and "ndcg@10_ci" in rows["BPR_REKI"]


@pytest.mark.parametrize("model", ["BPR", "SASRec"])  # a general loader (one row a user) and a sequential one
def test_each_test_users_values_belong_to_that_user(tiny_ranking_config, model):
    """The users file's token for a row is the user the evaluator scored in that row: each user's
    Hit@10, recomputed from the batches' own user ids, the model's scores and the positives."""
    from recbole_llmk.quick_start import create_model, prepare
    from recbole_llmk.utils import get_trainer

    config = dict(tiny_ranking_config, eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                                                  "mode": "full"})
    if model == "SASRec":
        config.update(train_neg_sample_args=None, MAX_ITEM_LIST_LENGTH=5)
    config, dataset, train_data, _, test_data = prepare(model, "tiny", config_dict=config)
    trainer = get_trainer(config)(config, create_model(config, train_data))
    result, users = harness_users.evaluated_per_user(trainer, test_data)
    hits = {}
    trainer.model.eval()
    with torch.no_grad():
        for batch in test_data:
            interaction, scores, positive_u, positive_i = trainer._full_sort_batch_eval(batch)
            top = torch.topk(scores, 10, dim=1).indices
            tokens = dataset.id2token(dataset.uid_field, interaction[dataset.uid_field].numpy())
            for row, token in enumerate(tokens):
                wanted = positive_i[positive_u == row]
                hits.setdefault(str(token), []).append(float(bool(torch.isin(wanted, top[row]).any())))
    assert len(users["user"]) == sum(len(v) for v in hits.values()) > 10
    recorded = {}
    for token, hit in zip(users["user"], users["hit@10"]):
        recorded.setdefault(token, []).append(hit)
    assert recorded == hits and 0 < sum(users["hit@10"]) < len(users["user"])
    assert abs(np.mean(users["hit@10"]) - result["hit@10"]) < 6e-5


def test_changes_by_user_activity_average_each_user_over_the_seeds():
    import users_by_activity

    counts = {1: {"a": 1, "b": 3, "c": 10, "d": 20}, 2: {"a": 3, "b": 1, "c": 30, "d": 20}}
    stock = {s: {"user": ["a", "b", "c", "d"], "ndcg@10": [0.5, 0.5, 0.5, 0.5]} for s in (1, 2)}
    variant = {1: {"user": ["a", "b", "c", "d"], "ndcg@10": [0.6, 0.4, 0.5, 0.3]},
               2: {"user": ["a", "b", "c", "c", "d"], "ndcg@10": [0.8, 0.4, 0.4, 0.6, 0.1]}}  # c scored twice
    low, high = users_by_activity.by_activity(counts, stock, variant, "ndcg@10", 2)
    # a, b: 2 interactions each on average, differences (0.1+0.3)/2 and (-0.1-0.1)/2
    assert (low["interactions"], low["users"], low["stock"]) == ("2-2", 2, 0.5)
    assert low["change"] == pytest.approx(0.05 / 0.5)
    assert low["half"] == pytest.approx(1.959964 * np.std([0.2, -0.1], ddof=1) / np.sqrt(2) / 0.5)
    # c: 20 on average, differences 0 and 0 (its two rows average to 0.5); d: 20, -0.2 and -0.4
    assert high["interactions"] == "20-20" and high["change"] == pytest.approx(-0.15 / 0.5)


def test_one_seed_reports_no_spread_and_no_test(tmp_path):
    suite = {"name": "s", "dataset": "d", "seeds": [1], "models": ["DIN", "DIN_REKI"]}
    cells = [{"model": "DIN", "seed": 1, "test": {"auc": 0.80}}, {"model": "DIN_REKI", "seed": 1, "test": {"auc": 0.82}}]
    rows = statistics.summarize(suite, cells)
    assert all("auc_std" not in r for r in rows)  # a std of one value is not a spread of 0
    report = reports.write_reports(suite, rows, str(tmp_path), 1.0, 1, 2, cells)
    assert "| DIN_REKI | 1 | 0.8200 | +2.50% (1 shared seed: no test) |" in report
    assert "nan" not in report and "±" not in report.split("\n\n")[0]
    path = plots.plot_uplift(cells, suite, "auc", str(tmp_path / "uplift.png"))
    assert open(path, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"  # a one-seed bar has no spread to draw
    assert statistics.summarize(suite, cells)[1]["auc_p"] is None  # and summary.csv leaves its p empty


def test_the_same_difference_on_every_seed_reports_no_test(tmp_path):
    # LEARN-tower2-tiled-logq against SASRec on Beauty, seeds 2020-2021: both NDCG@10 differences are
    # -0.0242 at RecBole's 4 decimals, and the t-test said p=0.000 with a zero-width interval
    suite = {"name": "s", "dataset": "d", "seeds": [1, 2], "models": ["SASRec", {"label": "LEARN", "model": "LEARN", "stock": "SASRec"}]}
    cells = [{"model": "SASRec", "seed": 1, "test": {"ndcg@10": 0.0426}}, {"model": "SASRec", "seed": 2, "test": {"ndcg@10": 0.042}},
             {"model": "LEARN", "seed": 1, "test": {"ndcg@10": 0.0184}}, {"model": "LEARN", "seed": 2, "test": {"ndcg@10": 0.0178}}]
    row = statistics.summarize(suite, cells)[1]
    assert row["ndcg@10_p"] is None and row["ndcg@10_ci"] is None
    report = reports.write_reports(suite, [row], str(tmp_path), 1.0, 1, 4, cells)
    assert "| LEARN | 2 | 0.0181 ± 0.0004 | -57.21% (the same difference on all 2 seeds: no test) |" in report
    cells[3]["test"]["ndcg@10"] = 0.0179  # one ten-thousandth apart: a test again
    assert statistics.summarize(suite, cells)[1]["ndcg@10_p"] is not None


def test_a_row_whose_cells_ran_on_cpu_and_gpu_reports_no_times(tmp_path):
    suite = {"name": "s", "dataset": "d", "seeds": [1, 2, 3], "models": ["DIN", "DIN_REKI"]}
    cpu = {"train_epoch_seconds": 120.0, "infer_batch_ms": 700.0, "epochs_run": 40}
    gpu = {"train_epoch_seconds": 4.0, "infer_batch_ms": 20.0, "epochs_run": 30, "peak_gpu_mb": 660.0}
    cells = [{"model": "DIN", "seed": s, "test": {"auc": 0.80 + s / 100}, **cpu} for s in (1, 2, 3)]
    cells += [{"model": "DIN_REKI", "seed": 1, "test": {"auc": 0.82}, **cpu},
              {"model": "DIN_REKI", "seed": 2, "test": {"auc": 0.835}, **gpu, "device": "cuda"},
              {"model": "DIN_REKI", "seed": 3, "test": {"auc": 0.84}, **gpu}]  # before the device was recorded
    rows = {r["model"]: r for r in statistics.summarize(suite, cells)}
    assert rows["DIN"]["ran_on"] == "CPU 3" and rows["DIN"]["train_epoch_seconds"] == 120.0
    assert rows["DIN_REKI"]["ran_on"] == "CPU 1, GPU 2"
    assert "train_epoch_seconds" not in rows["DIN_REKI"] and "infer_batch_ms" not in rows["DIN_REKI"]
    assert rows["DIN_REKI"]["epochs_run"] == pytest.approx(100 / 3) and "auc_p" in rows["DIN_REKI"]
    report = reports.write_reports(suite, list(rows.values()), str(tmp_path), 1.0, 1, 6, cells)
    assert report.split("\n")[3].endswith("|  |  |  |  |  |  |  |  | 33.3 | CPU 1, GPU 2 |")


def test_suite_paths_may_start_at_the_repository():
    suite = {"models": ["DeepFM"], "seeds": [1], "config": {"reki_release_path": "{repo}/../shared/x", "n": 3},
             "model_config": {}}
    config = schema.cell_config(suite, schema.entries(suite)[0], 1)
    assert config["reki_release_path"] == f"{ROOT}/../shared/x"
    assert config["n"] == 3 and config["seed"] == 1


def test_the_packaged_smollm2_is_a_placeholder_its_settings_keep():
    from recbole_llmk.knowledge.local_llm import packaged_gguf

    suite = {"models": [{"label": "x", "model": "DeepFM_REKI", "config": {"llm_model": "{smollm2}"}}], "seeds": [1],
             "config": {"oops": "{nope}"}, "model_config": {}}
    entry = schema.entries(suite)[0]
    assert schema.cell_settings(suite, entry, 1)["llm_model"] == "{smollm2}"  # the same on every machine
    with pytest.raises(KeyError, match="unknown placeholder {nope}"):
        schema.cell_config(suite, entry, 1)
    del suite["config"]["oops"]
    if packaged_gguf():
        assert schema.cell_config(suite, entry, 1)["llm_model"] == packaged_gguf()


def test_setup_commands_run_in_the_repository_before_the_cells(tmp_path):
    out = tmp_path / "made.txt"
    suite = {"setup": [f"{{python}} -c \"import os; open(r'{out}', 'w').write(os.getcwd())\""]}
    run_suite.run_setup(suite, str(tmp_path))
    assert os.path.samefile(out.read_text(), ROOT)
    with pytest.raises(subprocess.CalledProcessError):
        run_suite.run_setup({"setup": ["{python} -c \"raise SystemExit(3)\""]}, str(tmp_path))


def test_a_runner_waits_for_another_runners_setup(tmp_path):
    import threading

    from recbole_llmk.knowledge.pipeline import store_lock

    out = tmp_path / "made.txt"
    suite = {"setup": [f"{{python}} -c \"open(r'{out}', 'w').write('done')\""]}
    with store_lock(str(tmp_path / "claims" / "setup")):  # another runner's setup is under way
        runner = threading.Thread(target=run_suite.run_setup, args=(suite, str(tmp_path)))
        runner.start()
        runner.join(timeout=3)
        assert runner.is_alive() and not out.exists()
    runner.join(timeout=60)
    assert out.read_text() == "done"


def test_random_encoder_has_the_asked_width_and_tells_texts_apart(tmp_path):
    from random_encoder import write_random_encoder

    from recbole_llmk.knowledge.encoder import TextEncoder

    path = write_random_encoder(128, str(tmp_path / "random-128"))
    encoder = TextEncoder(path)
    vectors = encoder.encode(["a red lipstick", "a science fiction movie", "a red lipstick"])
    assert encoder.dim == 128 and vectors.shape == (3, 128)
    assert np.allclose(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])
    assert write_random_encoder(128, path) == path  # already there: left as it is


def test_an_entry_or_the_command_line_may_run_fewer_seeds():
    suite = {"models": ["DeepFM", {"label": "wide", "model": "DeepFM_REKI", "seeds": [2]}], "seeds": [1, 2, 3]}
    assert schema.cells_of(suite, ["DeepFM", "wide"]) == [("DeepFM", 1), ("DeepFM", 2), ("DeepFM", 3), ("wide", 2)]
    with pytest.raises(SystemExit, match="DIN"):
        schema.cells_of(suite, ["DIN"])
    assert schema.cells_of(suite, ["DeepFM", "wide"], seeds=[2, 3]) == [("DeepFM", 2), ("DeepFM", 3), ("wide", 2)]
    with pytest.raises(SystemExit, match=r"\[4\]"):
        schema.cells_of(suite, ["DeepFM"], seeds=[4])


def test_device_kit_carries_the_shared_data_a_suite_names():
    import device_session

    suite = schema.load_suite(os.path.join(ROOT, "benchmarks", "suites", "reki_released_ml1m_u2999.yaml"))
    paths = device_session.shared_paths(suite)
    assert {"ml-1m", "reki/ml-1m/proc_data/group_data"} <= set(paths)
    if os.path.isfile(os.path.join(device_session.SHARED, "ml-1m", "movies.dat")):
        assert "ml-1m/movies.dat" in paths  # the release's titles are resolved against it
    ml100k = schema.load_suite(os.path.join(ROOT, "benchmarks", "suites", "reki_ml100k.yaml"))
    assert device_session.shared_paths(ml100k) == []  # RecBole ships ml-100k


def test_unpacked_device_cells_join_the_results_without_replacing_any(workdir):
    suite = {"dataset": "tiny", "models": ["DIN", "DIN_REKI"], "seeds": [1, 2], "config": {}}
    path = workdir / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))

    def cell(model, seed, auc):
        return {"model": model, "seed": seed, "test": {"auc": auc}, "epochs_run": 3,
                "settings": {"seed": seed, "show_progress": False, "eval_fixed_negatives": True}}

    cells = workdir / "results" / "suite" / "cells"
    cells.mkdir(parents=True)
    (cells / "DIN-1.json").write_text(json.dumps(cell("DIN", 1, 0.70)))
    fetched = workdir / "fetched"
    (fetched / "cells").mkdir(parents=True)
    for model, seed, auc in (("DIN", 1, 0.99), ("DIN", 2, 0.72), ("DIN_REKI", 1, 0.73), ("DIN_REKI", 2, 0.75)):
        (fetched / "cells" / f"{model}-{seed}.json").write_text(json.dumps(cell(model, seed, auc)))
    (fetched / "cells" / "DIN_REKI-3.json.partial").write_text("{")  # a copy the machine cut short
    harness_users.write_users(str(fetched / "users" / "DIN-2.csv.gz"), {"user": ["7"], "ndcg@10": [0.5]})
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_session.py"), "unpack", str(path),
                           str(fetched), "--results", str(workdir / "results")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DIN-1.json: already in" in done.stdout
    assert json.loads((cells / "DIN-1.json").read_text())["test"]["auc"] == 0.70
    assert sorted(os.listdir(cells)) == ["DIN-1.json", "DIN-2.json", "DIN_REKI-1.json", "DIN_REKI-2.json"]
    users = workdir / "results" / "suite" / "users" / "DIN-2.csv.gz"
    assert harness_users.read_users(str(users)) == {"user": ["7"], "ndcg@10": [0.5]}  # the cell's users came with it
    summary = (workdir / "results" / "suite" / "summary.md").read_text()
    assert "| DIN_REKI | 2 | 0.7400 ± 0.0141 |" in summary and "no cell ran in this invocation" in summary


def test_device_kit_payload_is_compressed_and_comes_back_whole(tmp_path):
    import device_session

    kit = tmp_path / "kit"
    store = kit / "repo" / "benchmarks" / "results" / "knowledge" / "s"
    store.mkdir(parents=True)
    texts = "".join(json.dumps({"tokens": [str(i)], "text": "a user who likes quiet dramas"}) + "\n" for i in range(2000))
    (store / "user.texts.jsonl").write_text(texts)
    np.save(store / "user.vectors.npy", np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    (kit / "shared" / "data" / "ml-1m").mkdir(parents=True)
    (kit / "shared" / "data" / "ml-1m" / "movies.dat").write_text("1::Toy Story (1995)::Animation\n" * 500)
    (kit / "wheels").mkdir()
    (kit / "wheels" / "x.whl").write_bytes(b"zip")
    before = device_session.size_mb(kit)
    device_session.compress_payload(kit)
    assert sorted(os.listdir(kit)) == [device_session.PAYLOAD, "wheels"]  # wheels stay loose for pip
    assert device_session.size_mb(kit) < before / 3
    assert device_session.size_mb(kit / device_session.PAYLOAD) == pytest.approx(device_session.size_mb(kit), abs=1e-4)
    device_session.extract_payload(kit)
    assert (store / "user.texts.jsonl").read_text() == texts
    assert np.load(store / "user.vectors.npy").shape == (50, 8)
    assert (kit / "shared" / "data" / "ml-1m" / "movies.dat").read_text().count("\n") == 500


def test_a_cell_another_suite_ran_with_the_same_settings_is_copied_not_rerun(tmp_path):
    common = {"epochs": 3, "metrics": ["Hit", "NDCG"], "valid_metric": "NDCG@10"}
    theirs = {"dataset": "d", "seeds": [1], "config": dict(common, topk=[10, 50]),
              "models": ["SASRec", {"label": "SASRec-long", "model": "SASRec", "config": {"epochs": 9}}]}
    ours = {"dataset": "d", "seeds": [1], "config": dict(common, topk=[10]), "reuse_cells_from": ["b.yaml"],
            "models": ["SASRec", {"label": "long", "model": "SASRec", "config": {"epochs": 9}},
                       {"label": "longer", "model": "SASRec", "config": {"epochs": 12}}]}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(theirs))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(ours))
    metrics = {"hit@10": 0.1, "hit@50": 0.3, "ndcg@10": 0.05, "ndcg@50": 0.09}

    def finish(recorded=True):  # what a runner of b leaves: its cells, with the settings they ran under
        b = schema.load_suite(str(tmp_path / "b.yaml"))
        for entry in b["entries"]:
            path = tmp_path / "results" / "b" / "cells" / f"{entry['label']}-1.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            cell = {"model": entry["label"], "dataset": b["dataset"], "seed": 1, "test": metrics, "valid": metrics}
            if recorded:
                cell["settings"] = schema.cell_settings(b, entry, 1)
            path.write_text(json.dumps(cell))
            harness_users.write_users(harness_users.users_file(str(path)), {"user": ["1", "2"], **{
                name: [value, value] for name, value in metrics.items()}})

    finish()
    suite = schema.load_suite(str(tmp_path / "a.yaml"))
    folder = str(tmp_path / "results" / "a")

    def twin(label):
        return staleness.twin_cell(suite, "SASRec", schema.cell_settings(suite, by_label[label], 1), 1,
                                   str(tmp_path / "results"))

    by_label = {e["label"]: e for e in suite["entries"]}
    assert twin("long").endswith("SASRec-long-1.json")
    assert twin("longer") is None  # trained otherwise

    failed, ran = run_suite.run_cells(suite, folder, [("SASRec", 1), ("long", 1)])
    assert (failed, ran) == ([], 0)  # nothing trained
    copied = json.load(open(os.path.join(folder, "cells", "SASRec-1.json")))
    assert copied["model"] == "SASRec" and copied["same_run_as"] == os.path.join("b", "cells", "SASRec-1.json")
    assert copied["test"] == {"hit@10": 0.1, "ndcg@10": 0.05}  # what this suite reports, no more
    assert harness_users.cell_users(folder, copied) == {"user": ["1", "2"], "hit@10": [0.1, 0.1], "ndcg@10": [0.05, 0.05]}
    assert json.load(open(os.path.join(folder, "cells", "long-1.json")))["model"] == "long"
    report = reports.write_reports(suite, statistics.summarize(suite, [copied]), folder, 1.0, 1, 0, [copied])
    assert "copied from b's runs of the same settings: 1 cell (see same_run_as)" in report

    assert copied["settings"]["topk"] == [10, 50]  # what ran
    assert staleness.stale_keys(suite, copied) == []  # and it stands for this suite's cell
    # a suite that copies the copy names the run where it happened, not the copy
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(dict(ours, reuse_cells_from=["a.yaml"])))
    chained = schema.load_suite(str(tmp_path / "chain.yaml"))
    assert run_suite.run_cells(chained, str(tmp_path / "results" / "chain"), [("SASRec", 1)]) == ([], 0)
    again = json.load(open(tmp_path / "results" / "chain" / "cells" / "SASRec-1.json"))
    assert again["same_run_as"] == os.path.join("b", "cells", "SASRec-1.json")

    # RecBole's default topk, other topk, other data, settings not recorded: another run (or unknown)
    for change in ({"topk": None}, {"topk": [20]}, {"dataset": "e"}, {}):
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(dict(theirs, config={**theirs["config"], **change})
                                                        if "topk" in change else dict(theirs, **change)))
        finish(recorded=bool(change))
        assert twin("SASRec") is None, change or "settings not recorded"
    # b's file changed after its cells ran: what counts is what they ran under
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(theirs))
    finish()
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(dict(theirs, config={**theirs["config"], "epochs": 7})))
    assert twin("SASRec").endswith("SASRec-1.json")
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(dict(ours, reuse_cells_from=["c.yaml"])))
    with pytest.raises(ValueError, match="a.yaml: reuse_cells_from.*c.yaml"):
        schema.load_suite(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("ours, theirs, seed, copied", [
    # reland_beauty's SASRec and SASRec+f_item rows are learn_beauty's; the rationale is ReLand's own
    ("reland_beauty", "learn_beauty", 2020, {"SASRec": "SASRec", "SASRec+f_item": "SASRec+item-text"}),
    # learn_ml100k's stock DIN is reki_released_ml100k's (their settings differ only in where the
    # checkpoints go and in a release path DIN never reads); its DeepFM splits otherwise
    ("learn_ml100k", "reki_released_ml100k", 2021, {"DIN": "DIN"}),
    ("reki_released_ml100k", "learn_ml100k", 2022, {"DIN": "DIN"}),  # and back: either may run a seed first
])
def test_real_suites_share_exactly_the_cells_that_are_the_same_run(tmp_path, ours, theirs, seed, copied):
    suites = os.path.join(ROOT, "benchmarks", "suites")
    suite = schema.load_suite(os.path.join(suites, f"{ours}.yaml"))
    other = schema.load_suite(os.path.join(suites, f"{theirs}.yaml"))
    for entry in other["entries"]:
        path = tmp_path / theirs / "cells" / f"{entry['label']}-{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"dataset": other["dataset"], "settings": schema.cell_settings(other, entry, seed)}))
    found = {}
    for entry in suite["entries"]:
        twin = staleness.twin_cell(suite, entry["model"], schema.cell_settings(suite, entry, seed), seed, str(tmp_path))
        if twin:
            found[entry["label"]] = os.path.basename(twin)
    assert found == {label: f"{source}-{seed}.json" for label, source in copied.items()}


def test_device_returns_each_cell_finished_since_it_started(tmp_path):
    import device_session

    cells, returned = tmp_path / "cells", tmp_path / "out" / "cells"
    cells.mkdir()
    (cells / "DIN-2020.json").write_text("{}")  # came with the working tree
    os.utime(cells / "DIN-2020.json", (1, 1))
    start = time.time() - 1
    assert device_session.return_finished_cells(str(cells), start, str(returned)) == []
    (cells / "DIN-2021.json").write_text('{"seed": 2021}')
    harness_users.write_users(str(tmp_path / "users" / "DIN-2021.csv.gz"), {"user": ["7"], "ndcg@10": [0.5]})
    (cells / "DIN-2022.json.partial").write_text("{")  # still being written
    assert device_session.return_finished_cells(str(cells), start, str(returned)) == ["DIN-2021.json"]
    assert sorted(os.listdir(returned)) == ["DIN-2021.json"]
    assert harness_users.read_users(str(tmp_path / "out" / "users" / "DIN-2021.csv.gz")) == {"user": ["7"], "ndcg@10": [0.5]}
    assert json.loads((returned / "DIN-2021.json").read_text()) == {"seed": 2021}


def test_a_paired_test_that_mixes_devices_or_code_is_marked():
    def cell(seed, device, commit, auc):
        return {"model": "x", "seed": seed, "device": device, "test": {"auc": auc}, "provenance": {"commit": commit}}

    suite = {"models": ["DeepFM", {"label": "V", "model": "DeepFM_REKI"}], "seeds": [1, 2, 3], "config": {},
             "model_config": {}}
    stock = [dict(cell(s, "cpu", "a", 0.70 + s / 100), model="DeepFM") for s in (1, 2, 3)]
    same = [dict(cell(s, "cpu", "a", 0.71 + s / 100), model="V") for s in (1, 2, 3)]
    rows = {r["model"]: r for r in statistics.summarize(suite, stock + same)}
    assert rows["V"]["mixed"] == "" and "‡" not in reports.change(rows["V"], "auc", "")
    mixed = [dict(cell(s, "cuda:0" if s == 3 else "cpu", "b" if s == 2 else "a", 0.71 + s / 100), model="V")
             for s in (1, 2, 3)]
    rows = {r["model"]: r for r in statistics.summarize(suite, stock + mixed)}
    assert reports.change(rows["V"], "auc", "").endswith(" ‡†")


def test_controls_add_a_shuffled_and_a_constant_row_per_knowledge_variant(tmp_path):
    suite = {"dataset": "tiny", "seeds": [1], "controls": ["shuffled", "constant"],
             "models": ["DeepFM", "DeepFM_REKI", {"label": "BPR+f_item", "model": "BPR_ReLand",
                                                  "config": {"reland_user_rationale": False}},
                        {"label": "plain", "model": "BPR_ReLand", "controls": []}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    entries = {e["label"]: e for e in schema.load_suite(str(path))["entries"]}
    assert list(entries) == ["DeepFM", "DeepFM_REKI", "DeepFM_REKI-shuffled", "DeepFM_REKI-constant", "BPR+f_item",
                             "BPR+f_item-shuffled", "BPR+f_item-constant", "plain"]
    control = entries["BPR+f_item-constant"]
    assert control["config"] == {"reland_user_rationale": False, "knowledge_control": "constant"}
    assert control["stock"] == "BPR" and control["versus"] == "BPR+f_item"


def test_a_cell_recorded_before_a_setting_existed_ran_with_its_old_value(tmp_path):
    """ReLand had only the attention fusion before ``reland_*_fusion``: such cells stand for a
    suite row that names attention, and are another run than one under today's defaults, which a
    cell now records even when its suite does not name them."""
    old = {"reland_item_text": False}
    attention = dict(old, reland_user_fusion="attention", reland_item_fusion="attention")
    assert staleness.run_differences("BPR_ReLand", attention, old) == []
    assert staleness.run_differences("BPR_ReLand", dict(attention, reland_user_fusion="gate"), old) == ["reland_user_fusion"]
    suite = {"dataset": "tiny", "seeds": [1], "models": ["BPR", "BPR_ReLand", "DeepFM_REKI"]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    suite = schema.load_suite(str(path))
    entries = {e["label"]: e for e in suite["entries"]}
    ours = schema.cell_settings(suite, entries["BPR_ReLand"], 1)
    assert ours["reland_user_fusion"] == "gate" and ours["reland_item_fusion"] == "concat"
    assert staleness.run_differences("BPR_ReLand", ours, {"seed": 1, "show_progress": False}) == [
        "reland_item_fusion", "reland_user_fusion"]
    assert "reland_user_fusion" not in schema.cell_settings(suite, entries["DeepFM_REKI"], 1)
    assert "reland_user_fusion" not in schema.cell_settings(suite, entries["BPR"], 1)


def test_sampled_evaluation_cells_from_before_fixed_negatives_are_another_run(tmp_path):
    """DIN's quick start evaluates on uni100: a DIN cell that does not record
    eval_fixed_negatives drew its own negatives; a full-ranking cell is the same run either way."""
    suite = {"dataset": "tiny", "seeds": [1], "models": ["DIN", "DIN_REKI", "DeepFM"],
             "model_config": {"DeepFM": {"eval_args": {"mode": {"valid": "full", "test": "uni100"}}}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    suite = schema.load_suite(str(path))
    for entry in suite["entries"]:
        ours = schema.cell_settings(suite, entry, 1)
        assert ours["eval_fixed_negatives"] is True
        recorded = {k: v for k, v in ours.items() if k != "eval_fixed_negatives"}
        assert staleness.run_differences(entry["model"], ours, recorded) == ["eval_fixed_negatives"]
    assert not schema.samples_at_evaluation("BPR", {}) and schema.samples_at_evaluation("DIEN_REKI", {})


def test_a_composed_cell_counts_the_generation_of_every_store_it_read(tmp_path):
    from harness.cells import knowledge_report

    from recbole_llmk.knowledge.store import KnowledgeStore

    entries = {"user": (["1"], [[0.0, 1.0]], ["t"])}
    one = KnowledgeStore.write(str(tmp_path / "a"), {"generation": {"requested": 95, "called": 95, "backend": "none",
                                                                    "seconds": 1.5}}, entries)
    two = KnowledgeStore.write(str(tmp_path / "b"), {"generation": {"requested": 2625, "called": 0, "backend": "none",
                                                                    "seconds": 2.0}}, entries)
    config = {"knowledge_stores": {"ReLand": one.path, "REKI": two.path}}
    assert knowledge_report(config, two) == {"requested": 2720, "called": 95, "seconds": 3.5, "backend": "none+none"}
    assert knowledge_report({"knowledge_stores": {"REKI": two.path}}, two)["requested"] == 2625
    assert knowledge_report({"knowledge_stores": None}, None) is None
