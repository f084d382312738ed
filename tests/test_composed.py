"""Techniques composed in one model (``<Base>_<T1>_<T2>``): each technique's store, each fusion in
turn, through RecBole's own trainer and full-sort evaluator."""

import pytest
import torch

from recbole_llmk.knowledge.store import KnowledgeStore
from recbole_llmk.model.layers import HEIN, FusedEmbedding
from recbole_llmk.quick_start import build_knowledge, create_model, prepare, run_recbole_llmk
from recbole_llmk.utils import get_model, split_techniques


@pytest.fixture
def composed_config(tiny_ranking_config):
    config = dict(tiny_ranking_config)
    config.update(reland_behaviour_epochs=1,
                  reland_behaviour_config={"embedding_size": 8}, reland_seed_ratio=0.2, reland_n_clusters=3,
                  hidden_size=8, inner_size=16, n_layers=1, n_heads=1,
                  eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"})
    return config


def sequential(config):
    return dict(config, train_neg_sample_args=None)  # RecBole's sequential models train with CE over all items


def test_names_parse_into_a_base_and_its_techniques_in_order():
    assert split_techniques("SASRec_ReLand_REKI") == ("SASRec", ("ReLand", "REKI"))
    assert split_techniques("BPR_REKI") == ("BPR", ("REKI",))
    assert split_techniques("DeepFM") == ("DeepFM", ())
    assert [p.technique for p in get_model("BPR_REKI_ReLand").parts] == ["REKI", "ReLand"]


@pytest.mark.parametrize("name", ["SASRec_ReLand_REKI", "BPR_REKI_ReLand"])
def test_a_composed_model_builds_every_store_fuses_each_in_turn_and_trains(composed_config, name):
    config = sequential(composed_config) if name.startswith("SASRec") else composed_config
    result = run_recbole_llmk(name, "tiny", config_dict=config)
    assert set(result["test_result"]) == {"hit@10", "ndcg@10"}
    model = result["model"]
    stores = {technique: KnowledgeStore.open(path).meta["technique"]
              for technique, path in result["knowledge_stores"].items()}
    assert stores == {"ReLand": "ReLand", "REKI": "REKI"}
    outer = model.item_embedding  # the second technique's fusion wraps the first's
    assert isinstance(outer, FusedEmbedding) and isinstance(outer.embedding, FusedEmbedding)
    assert isinstance(outer.embedding.embedding, torch.nn.Embedding)
    if name.startswith("SASRec"):  # both users' knowledge joins the sequence representation, ReLand's first
        assert model.user_prefixes == ["", "reki_"] and isinstance(model.reki_hein, HEIN)
    else:
        assert isinstance(model.user_embedding.embedding, FusedEmbedding) and isinstance(model.hein, HEIN)


@pytest.mark.parametrize("base", ["BPR", "SASRec"])
def test_a_composed_model_starts_as_the_stock_model_and_prestores_to_the_same_scores(composed_config, base):
    """Every default fusion starts as the identity, so the composition does too; prestoring HEIN's
    output (and dropping HEIN) serves the same scores."""
    config = sequential(composed_config) if base == "SASRec" else composed_config
    scores = {}
    for name in (base, f"{base}_ReLand_REKI"):
        cfg, _, train_data, _, test_data = prepare(name, "tiny", config_dict=config)
        build_knowledge(cfg, train_data)
        model = create_model(cfg, train_data).eval()
        batch = next(iter(test_data))[0]
        with torch.no_grad():
            scores[name] = model.full_sort_predict(batch)
            if name != base:
                for module in model.modules():  # move every fusion off the identity, as training would
                    for parameter in module.parameters(recurse=False):
                        parameter.add_(0.05)
                moved = model.full_sort_predict(batch)
                model.prestore_knowledge(drop_adapter=True)
                assert not any(isinstance(m, HEIN) for m in model.children())
                assert torch.allclose(model.full_sort_predict(batch), moved, atol=1e-5)
    assert torch.allclose(scores[base], scores[f"{base}_ReLand_REKI"], atol=1e-5)
    assert not torch.allclose(scores[base], moved, atol=1e-3)


def test_every_named_techniques_defaults_are_loaded(composed_config):
    config = prepare("BPR_ReLand_REKI", "tiny", config_dict=composed_config)[0]
    assert config["reki_knowledge"] == "individual" and config["reland_user_fusion"] == "gate"
    assert config["technique"] == "ReLand_REKI" and config["base_model"] == "BPR"


@pytest.fixture
def fields_config(tiny_config):
    """CTR settings with a time-ordered split (LEARN's features need one) and a tiny LEARN."""
    return dict(tiny_config, eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                                        "mode": "labeled"},
                learn_features_epochs=1, learn_features_config={
                    "embedding_size": 8, "hidden_size": 16, "inner_size": 16, "n_layers": 1, "n_heads": 1,
                    "learn_history_len": 5, "learn_target_len": 3, "train_batch_size": 64})


@pytest.mark.parametrize("base", ["DeepFM", "DSSM", "DIN"])
def test_field_techniques_compose_as_two_fields_each(fields_config, base):
    """REKI's and LEARN's HEINs each add a user and an item field (a double-tower model puts each
    user field in its user tower); the composed model trains, evaluates and prestores."""
    stock = prepare(base, "tiny", config_dict=fields_config)
    stock_model = create_model(stock[0], stock[2])
    result = run_recbole_llmk(f"{base}_REKI_LEARN", "tiny", config_dict=fields_config)
    assert set(result["test_result"]) == {"auc", "logloss"}
    model = result["model"]
    assert set(result["knowledge_stores"]) == {"REKI", "LEARN-features"}
    assert model.knowledge_names == ["knowledge", "learn_knowledge"]
    assert model.learn_knowledge.user_knowledge.shape[1] == 8  # LEARN's embeddings, not REKI's text vectors
    if base == "DIN":
        assert model.dnn_mlp_layers.inner.mlp_layers[1].in_features == \
            stock_model.dnn_mlp_layers.mlp_layers[1].in_features + 4 * fields_config["embedding_size"]
    else:
        assert model.num_feature_field == stock_model.num_feature_field + 4
    if base == "DSSM":
        assert model.user_token_field_num == stock_model.user_token_field_num + 2
    batch = next(iter(prepare(f"{base}_REKI_LEARN", "tiny", config_dict=fields_config)[4]))[0].to(model.device)
    model.eval()
    with torch.no_grad():
        before = model.predict(batch)
        model.prestore_knowledge(drop_adapter=True)
        assert torch.allclose(model.predict(batch), before, atol=1e-5)


@pytest.mark.parametrize("name, message", [
    ("DeepFM_ReLand_REKI", "DeepFM_ReLand_REKI is not supported: DeepFM is a context model; ReLand fuses into the ID tables"),
    ("DIN_REKI_ReLand", "DIN_REKI adds knowledge fields and DIN_ReLand fuses into ID tables; compose techniques"),
    ("LR_REKI_LEARN", "LR_REKI_LEARN is not supported: LR is first-order only"),
    ("SASRec_REKI_REKI", "names a technique twice"),
    ("Pop_ReLand_REKI", "Pop_ReLand_REKI is not supported: Pop is not a learned model"),
])
def test_a_composition_that_cannot_fuse_is_refused_by_name(name, message):
    with pytest.raises(ValueError, match=message):
        get_model(name)


def test_one_store_folder_for_several_techniques_is_refused(composed_config, tmp_path):
    with pytest.raises(ValueError, match="knowledge_store_path names one store folder, and BPR_ReLand_REKI builds one per"):
        run_recbole_llmk("BPR_ReLand_REKI", "tiny", config_dict=dict(composed_config, knowledge_store_path=str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()


def test_a_model_without_a_table_is_refused_before_any_knowledge_is_built(composed_config, tmp_path):
    config = dict(composed_config, knowledge_dir=str(tmp_path / "knowledge"))
    with pytest.raises(ValueError, match="FISM_ReLand_REKI is not supported: FISM"):
        run_recbole_llmk("FISM_ReLand_REKI", "tiny", config_dict=config)
    assert not (tmp_path / "knowledge").exists()


def test_a_composed_model_reuses_each_techniques_own_store(composed_config):
    """Each technique's store is the one its one-technique variant builds: composing costs no
    knowledge that was already built."""
    config = sequential(composed_config)

    def stores_of(name):
        cfg, _, train_data, _, _ = prepare(name, "tiny", config_dict=config)
        build_knowledge(cfg, train_data)
        return cfg["knowledge_stores"]

    alone = {**stores_of("SASRec_ReLand"), **stores_of("SASRec_REKI")}
    assert stores_of("SASRec_ReLand_REKI") == alone and set(alone) == {"ReLand", "REKI"}


def test_a_kept_evaluation_table_follows_a_change_to_the_table_it_wraps(composed_config):
    """The fused item table full-sort evaluation keeps depends on the table a first technique fused
    below it: a change there (its knowledge, in place) makes the outer table fuse again."""
    cfg, _, train_data, _, _ = prepare("BPR_ReLand_REKI", "tiny", config_dict=composed_config)
    build_knowledge(cfg, train_data)
    model = create_model(cfg, train_data).eval()
    outer = model.item_embedding
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():  # off the identity (at random: text vectors may sum to ~0)
            parameter.add_(0.05 * torch.randn_like(parameter))
        kept = outer.weight
        assert outer.weight is kept
        outer.embedding.knowledge.mul_(2.0)  # ReLand's item text, below REKI's fusion
        assert not torch.allclose(outer.weight, kept) and torch.allclose(outer.weight, outer._whole_table())
