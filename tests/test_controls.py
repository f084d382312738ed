"""Control knowledge (``knowledge_control``): same tables, content taken away; the store untouched."""

import numpy as np
import pytest
import torch

from recbole_llmk.knowledge.controls import apply_control
from recbole_llmk.quick_start import build_knowledge, create_model, prepare


def table(n=9, dim=4, seed=0):
    rows = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    rows[0] = 0.0  # padding
    return rows


def test_shuffled_gives_every_id_another_ids_row_and_moves_a_sides_kinds_together():
    liked, history = table(seed=1), table(seed=2)
    shuffled = apply_control(liked, "shuffled", 2020, "user")
    assert np.array_equal(shuffled[0], liked[0])
    order = [int(np.flatnonzero((liked == row).all(1))[0]) for row in shuffled[1:]]
    assert sorted(order) == list(range(1, len(liked))) and order != list(range(1, len(liked)))  # a permutation, not the identity
    again = apply_control(history, "shuffled", 2020, "user")  # another kind of the same side: same owners
    assert np.array_equal(again[1:], history[order])
    assert not np.array_equal(apply_control(liked, "shuffled", 2021, "user"), shuffled)  # the seed decides
    assert not np.array_equal(apply_control(liked, "shuffled", 2020, "item"), shuffled)  # each side its own
    assert apply_control(liked, None, 2020, "user") is liked


def test_constant_gives_every_id_the_mean():
    rows = table()
    constant = apply_control(rows, "constant", 2020, "item")
    assert np.array_equal(constant[0], rows[0])
    assert np.allclose(constant[1:], rows[1:].mean(0))


@pytest.fixture
def item_text_config(tiny_ranking_config):
    """BPR_ReLand with item text only ("+f_item"), ranked: one store, no seed prompts."""
    return dict(tiny_ranking_config, reland_user_rationale=False)


def test_a_control_run_reads_the_same_store_and_changes_only_what_the_model_gets(item_text_config):
    config = item_text_config
    tables, paths = {}, set()
    for control in (None, "shuffled", "constant"):
        cfg, _, train_data, _, _ = prepare("BPR_ReLand", "tiny", config_dict=dict(config, knowledge_control=control))
        paths.add(build_knowledge(cfg, train_data).path)
        tables[control] = create_model(cfg, train_data).item_embedding.knowledge
    real, shuffled, constant = tables[None], tables["shuffled"], tables["constant"]
    assert len(paths) == 1  # one store serves the real run and its controls
    assert len(torch.unique(real[1:], dim=0)) == len(real) - 1  # every item's text encodes to its own vector
    assert not torch.equal(real, shuffled)
    assert torch.equal(torch.sort(real[1:], dim=0).values, torch.sort(shuffled[1:], dim=0).values)
    assert torch.allclose(constant[1:], real[1:].mean(0).expand_as(constant[1:]), atol=1e-6)


def test_knowledge_norm_rescales_what_the_model_reads_after_the_control(item_text_config):
    """``reland_knowledge_norm``: the model's rows are the store's, centred and scaled to the norm;
    the store is untouched, and a constant control leaves no content (zeros)."""
    config = item_text_config
    tables = {}
    for control, norm in ((None, None), (None, 0.05), ("constant", 0.05)):
        cfg, _, train_data, _, _ = prepare("BPR_ReLand", "tiny", config_dict=dict(
            config, knowledge_control=control, reland_knowledge_norm=norm))
        build_knowledge(cfg, train_data)
        tables[control, norm] = create_model(cfg, train_data).item_embedding.knowledge.double()
    raw, scaled = tables[None, None][1:], tables[None, 0.05][1:]
    assert np.isclose(scaled.norm(dim=1).mean().item(), 0.05, rtol=1e-5)
    assert torch.allclose(scaled.mean(0), torch.zeros(scaled.shape[1], dtype=scaled.dtype), atol=1e-7)
    centred = raw - raw.mean(0)
    assert torch.allclose(scaled, centred * (0.05 / centred.norm(dim=1).mean()), atol=1e-6)
    assert torch.equal(tables["constant", 0.05], torch.zeros_like(tables["constant", 0.05]))
