"""docs/coverage.md's table is the code's: every RecBole model x technique."""

import os

import pytest

from recbole_llmk.coverage import BEGIN, END, TRAINED, TrainingDatasets, markdown, reason, support, trained_variants
from recbole_llmk.utils import TECHNIQUES, get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def coverage_table():
    with open(os.path.join(ROOT, "docs", "coverage.md"), encoding="utf-8") as f:
        text = f.read()
    rows = text.split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()[2:]
    table = {}
    for row in rows:
        if not row.startswith("|"):
            continue
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[1]] = dict(zip(TECHNIQUES, cells[2:]))
    return table


def test_cells_that_need_no_dataset_match_the_code():
    """Cells decided by name resolution alone (no fused-table check) are recomputed here."""
    table = coverage_table()
    assert len(table) >= 80 and {"BPR", "SASRec", "DeepFM", "DIN"} <= set(table)
    for model, cells in table.items():
        for technique, shown in cells.items():
            try:
                variant = get_model(f"{model}_{technique}")
            except ValueError as error:
                assert shown == f"– {reason(error, model)}", (model, technique)
                continue
            if not hasattr(variant, "check_fits"):
                assert shown in ("✓", TRAINED), (model, technique)


@pytest.mark.parametrize("name, expected", [("BPR_REKI", None), ("SASRec_LEARN", None),
                                            ("MultiVAE_REKI", "no user ID embedding table"),
                                            ("FPMC_ReLand", "no item ID embedding table")])
def test_fused_cells_come_from_the_models_tables(name, expected, workdir):
    assert support(name, TrainingDatasets(str(workdir))) == expected
    model, _, technique = name.rpartition("_")
    assert coverage_table()[model][technique] in (("✓", TRAINED) if expected is None else (f"– {expected}",))


def test_trained_marks_come_from_the_sweep_s_last_record_of_each_run(tmp_path):
    """A variant is marked trained when its last run of RecBole's own test passed; a table cell
    that marks it so is backed by a passed run in the committed sweep."""
    import json

    sweep = tmp_path / "runs.jsonl"
    runs = [{"test": "t_bpr", "variant": "BPR_REKI", "status": "failed"},
            {"test": "t_bpr", "variant": "BPR_REKI", "status": "passed"},  # rerun: the last record counts
            {"test": "t_sas", "variant": "SASRec_REKI", "status": "passed"},
            {"test": "t_sas", "variant": "SASRec_REKI", "status": "failed"}]
    sweep.write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    assert trained_variants(str(sweep)) == {"BPR_REKI"}
    rows = [("general", "BPR", {"REKI": None, "ReLand": None, "LEARN": None}),
            ("sequential", "SASRec", {"REKI": None, "ReLand": "no reason", "LEARN": None})]
    table = markdown(rows, {"BPR_REKI"})
    assert f"| general | BPR | {TRAINED} | ✓ | ✓ |" in table and "| sequential | SASRec | ✓ | – no reason | ✓ |" in table
    committed = os.path.join(ROOT, "benchmarks", "results", "recbole_model_tests", "runs.jsonl")
    if os.path.isfile(committed):
        passed = trained_variants(committed)
        marked = {f"{m}_{t}" for m, cells in coverage_table().items() for t, shown in cells.items() if shown == TRAINED}
        assert marked <= passed


def composed_cells():
    with open(os.path.join(ROOT, "docs", "coverage.md"), encoding="utf-8") as f:
        rows = f.read().split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()[2:]
    return {cells[1]: cells[-1] for cells in ([c.strip() for c in row.strip("|").split("|")]
                                              for row in rows if row.startswith("|"))}


@pytest.mark.parametrize("model, expected", [("BPR", "✓ BPR_REKI_ReLand_LEARN"), ("SASRec", "✓ SASRec_REKI_ReLand_LEARN"),
                                             ("DeepFM", "✓ DeepFM_REKI_LEARN"), ("DIN", "✓ DIN_REKI_LEARN")])
def test_the_composed_column_comes_from_composing_the_supported_techniques(model, expected, workdir):
    from recbole_llmk.coverage import composed_support

    datasets = TrainingDatasets(str(workdir))
    cells = {t: support(f"{model}_{t}", datasets) for t in TECHNIQUES}
    assert composed_support(model, cells, datasets).startswith(expected)
    assert composed_cells()[model].startswith(expected)
