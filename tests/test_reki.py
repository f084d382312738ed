"""REKI end to end on the tiny dataset, through RecBole's own trainer and evaluator."""

import inspect
import pkgutil

import pytest
import recbole.model.context_aware_recommender as car
import torch
from recbole.model.abstract_recommender import ContextRecommender

from recbole_llmk.model.knowledge_fields import UNSUPPORTED
from recbole_llmk.quick_start import build_knowledge, create_model, prepare, run_recbole_llmk
from recbole_llmk.utils import get_model, get_trainer


def context_models():
    """Every model class in RecBole's context_aware_recommender package."""
    names = []
    for info in pkgutil.iter_modules(car.__path__):
        module = __import__(f"{car.__name__}.{info.name}", fromlist=["_"])
        names += [n for n, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, ContextRecommender) and c is not ContextRecommender and c.__module__ == module.__name__]
    return sorted(set(names))


SUPPORTED = [m for m in context_models() if m not in UNSUPPORTED] + ["DIN", "DIEN"]


def test_every_context_model_is_covered():
    assert len(context_models()) >= 17
    assert set(UNSUPPORTED) <= set(context_models())


@pytest.mark.parametrize("base", SUPPORTED)
def test_variant_trains_evaluates_and_learns_from_knowledge(base, tiny_config):
    config, dataset, train_data, valid_data, test_data = prepare(f"{base}_REKI", "tiny", config_dict=tiny_config)
    assert config["metrics"] == ["AUC", "LogLoss"]
    build_knowledge(config, train_data)
    model = create_model(config, train_data)
    hein_before = {k: v.clone() for k, v in model.knowledge.hein.state_dict().items()}
    trainer = get_trainer(config)(config, model)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=True)  # reloads the best checkpoint
    assert set(result) == {"auc", "logloss"} and 0.0 <= result["auc"] <= 1.0
    changed = [k for k, v in model.knowledge.hein.state_dict().items() if not torch.equal(v, hein_before[k])]
    assert changed, f"{base}_REKI: HEIN received no gradient, the knowledge is ignored"


@pytest.mark.parametrize("base", ["DeepFM", "DIN", "DSSM"])
def test_prestored_vectors_predict_like_hein(base, tiny_config):
    config, dataset, train_data, valid_data, test_data = prepare(f"{base}_REKI", "tiny", config_dict=tiny_config)
    build_knowledge(config, train_data)
    model = create_model(config, train_data)
    get_trainer(config)(config, model).fit(train_data, valid_data, saved=False, show_progress=False)
    model.eval()
    batch = next(iter(test_data))[0].to(model.device)
    with torch.no_grad():
        expected = model.predict(batch)
        model.prestore_knowledge(drop_adapter=True)
        served = model.predict(batch)
    assert not hasattr(model.knowledge, "hein")
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["LR", "FFM", "FwFM", "Pop", "FISM"])  # BPR, SASRec: test_fused_knowledge
def test_unsupported_models_are_refused_with_the_reason(base):
    with pytest.raises(ValueError, match=f"{base}_REKI is not supported"):
        get_model(f"{base}_REKI")


def test_checkpoint_resumes_with_weights_only_load(tiny_config):
    config, dataset, train_data, valid_data, test_data = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    build_knowledge(config, train_data)
    trainer = get_trainer(config)(config, create_model(config, train_data))
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    state = torch.load(trainer.saved_model_file, weights_only=True)
    assert state["config"]["model"] == "DeepFM_REKI"
    resumed = get_trainer(config)(config, create_model(config, train_data))
    resumed.resume_checkpoint(trainer.saved_model_file)
    assert resumed.start_epoch == 1


def test_quick_start_runs_and_reports(tiny_config):
    result = run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=tiny_config)
    assert set(result["test_result"]) == {"auc", "logloss"}
    assert result["knowledge_store"]


def test_pca_reduced_knowledge_trains(tiny_config):
    tiny_config["knowledge_pca_dim"] = 4
    result = run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=tiny_config)
    hein = result["model"].knowledge.hein
    assert hein.user_gate.in_features == 4 and result["model"].knowledge.user_knowledge.shape[1] == 4
    assert set(result["test_result"]) == {"auc", "logloss"}


def test_hein_with_unequal_user_and_item_widths_shares_its_experts():
    from recbole_llmk.model.layers import HEIN

    hein = HEIN(user_dim=12, item_dim=8, output_dim=4, n_shared=1, n_user=1, n_item=1, hidden_sizes=[6])
    user, item = hein(torch.randn(5, 12), torch.randn(5, 8))
    assert user.shape == item.shape == (5, 4)
    gates = torch.softmax(hein.user_gate(hein.user_in(torch.randn(3, 12))), -1)
    torch.testing.assert_close(gates.sum(-1), torch.ones(3))
    for side in (lambda: hein.user(torch.randn(5, 12)), lambda: hein.item(torch.randn(5, 8))):
        hein.zero_grad()
        side().sum().backward()
        assert hein.shared[0].mlp_layers[1].weight.grad.abs().sum() > 0  # the shared expert learns from both sides


def one_by_one(hein, side, knowledge):
    """HEIN's side as the paper writes it: each expert MLP on its own, mixed by the softmax gate."""
    project, experts, gate, out = ((hein.user_in, hein.user_experts, hein.user_gate, hein.user_out) if side == "user"
                                   else (hein.item_in, hein.item_experts, hein.item_gate, hein.item_out))
    x = project(knowledge)
    outputs = torch.stack([e(x) for e in (*hein.shared, *experts)], dim=1)
    return out((torch.softmax(gate(x), dim=-1).unsqueeze(-1) * outputs).sum(1))


@pytest.mark.parametrize("hidden_sizes", [[6], [16, 8, 4]])
def test_hein_batched_experts_equal_the_experts_one_by_one(hidden_sizes):
    from recbole_llmk.model.layers import HEIN

    torch.manual_seed(0)
    hein = HEIN(user_dim=12, item_dim=8, output_dim=4, n_shared=2, n_user=1, n_item=3, hidden_sizes=hidden_sizes)
    inputs = {"user": torch.randn(7, 12), "item": torch.randn(7, 8)}
    for side, knowledge in inputs.items():
        grads = []
        for compute in (lambda: getattr(hein, side)(knowledge), lambda: one_by_one(hein, side, knowledge)):
            hein.zero_grad()
            out = compute()
            (out * torch.arange(out.numel()).view_as(out)).sum().backward()
            grads.append((out.detach(), {n: p.grad.clone() for n, p in hein.named_parameters() if p.grad is not None}))
        (batched, batched_grads), (reference, reference_grads) = grads
        torch.testing.assert_close(batched, reference)
        assert batched_grads.keys() == reference_grads.keys()
        for name in reference_grads:
            torch.testing.assert_close(batched_grads[name], reference_grads[name], msg=name)


def test_hein_batched_experts_draw_a_dropout_mask_per_expert():
    from recbole_llmk.model.layers import HEIN

    torch.manual_seed(0)
    hein = HEIN(user_dim=6, item_dim=6, output_dim=3, n_shared=1, n_user=1, n_item=1, hidden_sizes=[5], dropout=0.5)
    knowledge = torch.randn(64, 6)
    hein.train()
    assert not torch.equal(hein.user(knowledge), hein.user(knowledge))  # masks drawn each call
    hein.eval()
    torch.testing.assert_close(hein.user(knowledge), one_by_one(hein, "user", knowledge))  # none at evaluation


def test_hein_in_bfloat16_multiplies_its_first_layers_in_bfloat16_and_trains_float32_parameters():
    from recbole_llmk.model.layers import HEIN

    torch.manual_seed(0)
    exact = HEIN(user_dim=64, item_dim=64, output_dim=4, n_shared=2, n_user=1, n_item=1, hidden_sizes=[32, 8])
    low = HEIN(user_dim=64, item_dim=64, output_dim=4, n_shared=2, n_user=1, n_item=1, hidden_sizes=[32, 8],
               precision="bfloat16")
    low.load_state_dict(exact.state_dict())
    knowledge = torch.randn(50, 64)
    outputs = []
    for hein in (exact, low):
        out = hein.user(knowledge)
        out.sum().backward()
        outputs.append(out.detach())
    assert not torch.equal(outputs[0], outputs[1])  # the bfloat16 products round differently
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0.05, atol=0.02)
    for (name, p), q in zip(exact.named_parameters(), low.parameters()):
        assert q.dtype == torch.float32 and (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert q.grad.dtype == torch.float32
            # bfloat16 keeps ~3 digits, and a rounded pre-activation can cross ReLU's kink: compare norms
            assert (q.grad - p.grad).norm() < 0.15 * p.grad.norm(), name


def test_hein_refuses_an_unknown_precision(tiny_config):
    from recbole_llmk.model.layers import HEIN

    with pytest.raises(ValueError, match="hein_precision: 'half' is not one of float32, bfloat16"):
        HEIN(user_dim=8, item_dim=8, output_dim=2, precision="half")
    # and the run's config refuses it before any knowledge is built
    with pytest.raises(ValueError, match="hein_precision: 'half' is not one of float32 [|] bfloat16"):
        prepare("DeepFM_REKI", "tiny", config_dict=dict(tiny_config, hein_precision="half"))


def test_hein_in_bfloat16_with_dropout_trains_float32_parameters():
    from recbole_llmk.model.layers import HEIN

    torch.manual_seed(0)
    hein = HEIN(user_dim=16, item_dim=16, output_dim=3, n_shared=1, n_user=1, n_item=1, hidden_sizes=[8],
                dropout=0.5, precision="bfloat16")
    hein.train()
    out = hein.item(torch.randn(32, 16))
    out.sum().backward()
    assert out.dtype == torch.float32
    first = hein.item_experts[0].mlp_layers[1].weight
    assert first.grad.dtype == torch.float32 and first.grad.abs().sum() > 0
    assert hein.item_gate.weight.grad.dtype == torch.float32 and hein.item_gate.weight.grad.abs().sum() > 0
