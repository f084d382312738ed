"""REKI and LEARN knowledge on RecBole's general and sequential models: HEIN's vectors fused into
their ID embeddings (``model.fusion``), through RecBole's own trainer and full-sort evaluator."""

import pytest
import torch

from recbole_llmk.model.layers import FusedEmbedding
from recbole_llmk.quick_start import build_knowledge, create_model, prepare, run_recbole_llmk
from recbole_llmk.utils import get_trainer

SEQUENTIAL = {"GRU4Rec", "SASRec", "BERT4Rec", "NARM"}


@pytest.fixture
def fused_config(tiny_ranking_config):
    config = dict(tiny_ranking_config)
    config.update(eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
                  hidden_size=8, inner_size=16, n_layers=1, n_heads=1)
    return config


def for_model(config, base):
    """RecBole 1.2.1's sequential models train with CE over all items: no negative sampling."""
    return dict(config, train_neg_sample_args=None) if base in SEQUENTIAL else config


def trained(name, config):
    config, _, train_data, valid_data, test_data = prepare(name, "tiny", config_dict=config)
    build_knowledge(config, train_data)
    model = create_model(config, train_data)
    hein_before = {k: v.clone() for k, v in model.hein.state_dict().items()}
    trainer = get_trainer(config)(config, model)
    trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    return model, trainer, test_data, hein_before


@pytest.mark.parametrize("base", ["BPR", "NeuMF", "LightGCN", "NGCF", "GRU4Rec", "SASRec", "BERT4Rec", "NARM"])
def test_every_fused_reki_variant_trains_evaluates_and_learns_from_knowledge(fused_config, base):
    model, trainer, test_data, hein_before = trained(f"{base}_REKI", for_model(fused_config, base))
    result = trainer.evaluate(test_data, load_best_model=False)
    assert set(result) == {"hit@10", "ndcg@10"}
    fused = [name for name, m in model.named_children() if isinstance(m, FusedEmbedding)]
    assert any("item" in name for name in fused)
    assert any("user" in name for name in fused) or model.user_fusion is not None
    changed = [k for k, v in model.hein.state_dict().items() if not torch.equal(v, hein_before[k])]
    assert changed, f"{base}_REKI: HEIN received no gradient, the knowledge is ignored"


@pytest.mark.parametrize("base", ["BPR", "SASRec"])
def test_a_fused_variant_starts_as_the_stock_model_and_serves_prestored_vectors(fused_config, base):
    config = for_model(fused_config, base)
    scores = {}
    for name in (base, f"{base}_REKI", f"{base}_REKI/attention"):
        model_name, _, fusion = name.partition("/")
        cfg, _, train_data, _, test_data = prepare(model_name, "tiny", config_dict=dict(
            config, **({"hein_fusion": fusion} if fusion else {})))
        build_knowledge(cfg, train_data)
        model = create_model(cfg, train_data).eval()
        batch = next(iter(test_data))[0]
        with torch.no_grad():
            scores[name] = model.full_sort_predict(batch)
    assert torch.allclose(scores[base], scores[f"{base}_REKI"], atol=1e-5)
    assert not torch.allclose(scores[base], scores[f"{base}_REKI/attention"], atol=1e-3)

    model, _, test_data, _ = trained(f"{base}_REKI", config)  # trained: the gate is open
    model.eval()
    batch = next(iter(test_data))[0]
    with torch.no_grad():
        expected = model.full_sort_predict(batch)
        model.prestore_knowledge(drop_adapter=True)
        served = model.full_sort_predict(batch)
    assert not hasattr(model, "hein") and not torch.allclose(expected, scores[base], atol=1e-4)
    assert torch.allclose(expected, served, atol=1e-5)


def test_full_sort_evaluation_fuses_the_table_once_until_a_weight_changes(fused_config):
    """BPR reads its whole item table for every evaluation batch: fused (HEIN over every item) once,
    then reused; a training step or a loaded checkpoint makes it fuse again, never serve stale rows."""
    model, trainer, test_data, _ = trained("BPR_REKI", fused_config)
    table = model.item_embedding
    batch = next(iter(test_data))[0]

    def evaluated():
        model.eval()
        with torch.no_grad():
            return table.weight, model.full_sort_predict(batch)

    first, scores = evaluated()
    again, _ = evaluated()
    assert again is first  # the same tensor: not fused again
    model.train()
    fresh = table.weight  # training: always computed, with gradients
    assert fresh.requires_grad and torch.allclose(fresh, first, atol=1e-6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model.calculate_loss(batch_for_loss(test_data, model))
    loss.backward()
    trainer.optimizer.step()
    stepped, stepped_scores = evaluated()
    assert stepped is not first and not torch.allclose(stepped, first)
    model.train()
    with torch.no_grad():
        assert torch.allclose(stepped, table.weight)  # what an uncached fusion gives now
    model.load_state_dict(state)
    restored, restored_scores = evaluated()
    assert restored is not stepped and torch.allclose(restored, first) and torch.allclose(restored_scores, scores)


def batch_for_loss(test_data, model):
    """A small training batch of (user, positive, negative) ids from the evaluation users."""
    from recbole.data.interaction import Interaction

    users = next(iter(test_data))[0][model.USER_ID][:8]
    return Interaction({model.USER_ID: users, model.ITEM_ID: (users % 5) + 1, model.NEG_ITEM_ID: (users % 7) + 2})


def test_sasrec_learn_fuses_learn_embeddings_from_the_same_split(fused_config):
    config = dict(for_model(fused_config, "SASRec"), learn_features_epochs=1, learn_features_config={
        "embedding_size": 8, "hidden_size": 16, "inner_size": 16, "n_layers": 1, "n_heads": 1,
        "learn_history_len": 5, "learn_target_len": 3, "train_batch_size": 64})
    result = run_recbole_llmk("SASRec_LEARN", "tiny", config_dict=config)
    assert set(result["test_result"]) == {"hit@10", "ndcg@10"}
    model = result["model"]
    assert isinstance(model.item_embedding, FusedEmbedding) and model.user_knowledge.shape == (31, 8)


@pytest.mark.parametrize("base, why", [("FISM", "without a user table"), ("MultiVAE", "no user ID embedding table")])
def test_a_model_without_id_tables_is_refused_before_any_knowledge(fused_config, workdir, base, why):
    with pytest.raises(ValueError, match=f"{base}_REKI is not supported.*{why}") as refused:
        run_recbole_llmk(f"{base}_REKI", "tiny", config_dict=dict(fused_config, knowledge_dir=str(workdir / "fresh")))
    assert "What fits" not in str(refused.value)  # its other fused variants need the same tables
    assert not any((workdir / "fresh").rglob("meta.json"))


@pytest.mark.parametrize("base", ["RepeatNet", "SASRecCPR"])
def test_a_sequential_model_without_one_sequence_representation_is_refused_before_any_knowledge(fused_config, workdir, base):
    """RecBole's own model tests crashed these after the knowledge build: RepeatNet's forward returns
    item probabilities, SASRecCPR's a list."""
    with pytest.raises(ValueError, match=f"{base}_REKI is not supported: {base} returns"):
        run_recbole_llmk(f"{base}_REKI", "tiny", config_dict=dict(fused_config, train_neg_sample_args=None,
                                                                   knowledge_dir=str(workdir / "fresh")))
    assert not any((workdir / "fresh").rglob("meta.json"))
