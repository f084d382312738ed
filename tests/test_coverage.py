"""docs/coverage.md's table is the code's: every RecBole model x technique."""

import os

import pytest

from recbole_llmk.coverage import BEGIN, END, TrainingDatasets, reason, support
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
                assert shown == "✓", (model, technique)


@pytest.mark.parametrize("name, expected", [("BPR_REKI", None), ("SASRec_LEARN", None),
                                            ("MultiVAE_REKI", "no user ID embedding table"),
                                            ("FPMC_ReLand", "no item ID embedding table")])
def test_fused_cells_come_from_the_models_tables(name, expected, workdir):
    assert support(name, TrainingDatasets(str(workdir))) == expected
    model, _, technique = name.rpartition("_")
    assert coverage_table()[model][technique] == ("✓" if expected is None else f"– {expected}")
