"""ReLand: seed sampling, retrieval, rationale parsing, fusion, and every `<Base>_ReLand` end to end."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from recbole_llmk.knowledge.history import training_dataset, training_interactions
from recbole_llmk.knowledge.store import KnowledgeStore
from recbole_llmk.model.layers import AttentionFusion, ConcatFusion, FusedEmbedding, GatedFusion
from recbole_llmk.quick_start import build_knowledge, create_model, prepare, run_recbole_llmk
from recbole_llmk.techniques.reland import (SeedSampler, WeightedDraws, nearest_seeds, parse_rationale, proportional_allocation,
                                            reland_requests, rescaled, train_behaviour_encoder)
from recbole_llmk.utils import get_model


def blobs(sizes, dim=4, seed=0):
    """Well-separated Gaussian clusters of the given sizes, and each point's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 20
    points = np.concatenate([c + rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    return points.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


# --- seed sampling ---------------------------------------------------------------------------------
def test_proportional_allocation():
    assert proportional_allocation(10, [50, 30, 20]).tolist() == [5, 3, 2]
    assert proportional_allocation(4, [90, 5, 5]).tolist() == [2, 1, 1]  # every cluster first gets one
    assert proportional_allocation(9, [2, 3, 100]).tolist()[:2] == [1, 1]
    assert proportional_allocation(50, [2, 3, 4]).tolist() == [2, 3, 4]  # never more than a cluster has


def test_seed_sampling_size_and_reproducibility():
    points, _ = blobs([60, 30, 10])
    counts = np.arange(1, 101)
    first = SeedSampler(17, n_clusters=3, seed=1).sample(points, counts)
    assert len(first) == 17 and len(set(first.tolist())) == 17
    assert np.array_equal(first, SeedSampler(17, n_clusters=3, seed=1).sample(points, counts))
    assert not np.array_equal(first, SeedSampler(17, n_clusters=3, seed=2).sample(points, counts))
    assert len(SeedSampler(100, n_clusters=3).sample(points, counts)) == 100  # everybody
    with pytest.raises(ValueError, match="between 1 and 100"):
        SeedSampler(101).sample(points, counts)


def numpy_draws(rng, weights, taken, m):
    """The importance-aware picks as seed sampling made them before WeightedDraws: numpy's choice
    over every user, the taken ones at weight 0."""
    weights = np.where(taken, 0.0, weights)
    return rng.choice(len(weights), m, replace=False, p=weights / weights.sum()).tolist()


@pytest.mark.parametrize("n, seed", [(1, 0), (7, 1), (500, 2), (5000, 3)])
def test_weighted_draws_pick_what_numpy_choice_picks(n, seed):
    rng = np.random.default_rng(seed)
    weights = np.maximum(rng.integers(0, 50, n).astype(float), 1e-12)  # some users with ~no activity
    ours, theirs = np.random.default_rng(seed + 100), np.random.default_rng(seed + 100)
    draws, taken = WeightedDraws(weights), np.zeros(n, dtype=bool)
    while not taken.all():
        for user in rng.choice(np.flatnonzero(~taken), min(3, (~taken).sum()), replace=False):
            draws.remove(user)  # taken elsewhere (a representative pick)
            taken[user] = True
        m = min(int(rng.integers(1, 20)), int((~taken).sum()))
        if m:
            expected = numpy_draws(theirs, weights, taken, m)
            assert draws.draw(ours, m) == expected
            taken[expected] = True
    assert ours.random() == theirs.random()  # the generator was consumed alike


def test_seed_sampling_is_not_quadratic_in_users():
    """One pick per round (the slowest schedule) over 10^5 users: numpy's choice per round made
    this ~10^4 passes over every user."""
    import time

    rng = np.random.default_rng(0)
    vectors, counts = rng.normal(size=(100_000, 8)).astype(np.float32), rng.integers(1, 200, 100_000)
    began = time.process_time()
    seeds = SeedSampler(10_000, n_clusters=10, round_size=1, seed=0).sample(vectors, counts)
    assert len(set(seeds.tolist())) == 10_000
    assert time.process_time() - began < 3.5  # 1.3 s here; 6.7 s with numpy's choice per round


def test_representative_picks_cover_every_cluster_in_proportion():
    sizes = [120, 60, 15, 5]
    points, _ = blobs(sizes)
    sampler = SeedSampler(40, n_clusters=4, seed=0)
    seeds = sampler.sample(points, np.ones(len(points)))
    representative = seeds[np.array(sampler.how_) == "representative"]
    labels = sampler.labels_
    per_cluster = np.bincount(labels[representative], minlength=4)
    assert (per_cluster >= 1).all()  # every cluster is represented
    expected = len(representative) * np.bincount(labels, minlength=4) / len(labels)
    assert np.abs(per_cluster - expected).max() <= 1.5
    # a cluster's first pick is the user closest to its centre
    for k, centre in enumerate(sampler.centroids_):
        members = np.flatnonzero(labels == k)
        closest = members[np.argmin(((points[members] - centre) ** 2).sum(1))]
        assert closest in representative


def test_importance_sampling_favours_active_users():
    points, _ = blobs([100, 100])
    counts = np.random.default_rng(0).pareto(1.5, size=200) * 10 + 1
    adaptive = SeedSampler(40, n_clusters=2, seed=0)
    seeds = adaptive.sample(points, counts)
    important = seeds[np.array(adaptive.how_) == "important"]
    uniform = SeedSampler(40, strategy="uniform", seed=0).sample(points, counts)
    assert counts[important].mean() > 2 * counts.mean()
    assert counts[important].mean() > counts[uniform].mean()


def test_retrieval_returns_the_nearest_seed_by_cosine():
    vectors = np.array([[1, 0], [0, 1], [9, 1], [1, 9], [-1, 0], [0.2, -1]], dtype=np.float32)
    position, similarity = nearest_seeds(vectors, vectors[[0, 1]])
    assert position.tolist() == [0, 1, 0, 1, 1, 0]  # [-1, 0]: cos -1 vs 0; [0.2, -1]: cos 0.196 vs -0.98
    assert similarity[0] == pytest.approx(1.0) and similarity[2] == pytest.approx(9 / np.sqrt(82), rel=1e-5)


def test_ivf_retrieval_is_exact_when_it_searches_every_cell_and_close_when_it_does_not():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    seeds = vectors[rng.choice(3000, 400, replace=False)]
    exact, exact_similarity = nearest_seeds(vectors, seeds)
    every_cell, _ = nearest_seeds(vectors, seeds, "ivf", nprobe=10 ** 6)
    assert np.array_equal(every_cell, exact)
    some_cells, similarity = nearest_seeds(vectors, seeds, "ivf", nprobe=8)
    assert (some_cells >= 0).all() and (similarity <= exact_similarity + 1e-5).all()
    assert 0.6 < (some_cells == exact).mean() < 1.0  # approximate: 8 of 80 cells, random 16-d points
    with pytest.raises(ValueError, match="reland_retrieval must be one of"):
        nearest_seeds(vectors, seeds, "hnsw")


# --- rationales ------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer", [
    "Step 1: Loves dramas.\nStep 2: More dramas, e.g. Title3.",
    "Sure! Here you go.\n**Step 1:** Loves dramas.\n\n**Step 2:** More dramas, e.g. Title3.",
    "### STEP 0 - history\nmany dramas\n### step 1. Loves dramas.\n### Step 2) More dramas, e.g. Title3.",
])
def test_rationale_parsing_tolerates_formats(answer):
    parsed = parse_rationale(answer)
    assert parsed.ok and parsed.summary == "Loves dramas." and parsed.recommendation == "More dramas, e.g. Title3."


@pytest.mark.parametrize("answer", ["I cannot help with that.", "Step 1: only a summary", "Step 2:\nStep 1: x", ""])
def test_malformed_rationales_are_flagged(answer):
    assert not parse_rationale(answer).ok


# --- fusion ----------------------------------------------------------------------------------------
def test_attention_fusion_is_a_convex_combination():
    torch.manual_seed(0)
    fusion = AttentionFusion(8, 5)
    e, t = torch.randn(6, 8), torch.randn(6, 5)
    z = fusion.project(t)
    a = fusion.weights(e, z)
    assert torch.allclose(a.sum(-1), torch.ones(6)) and (a > 0).all()
    assert torch.allclose(fusion(e, t), a[:, :1] * e + a[:, 1:] * z)
    sequence = torch.randn(6, 3, 8)  # every position of a sequence gets the user's vector
    assert torch.allclose(fusion(sequence, t)[:, 1], fusion(sequence[:, 1], t))


@pytest.mark.parametrize("fusion_class", [GatedFusion, ConcatFusion])
def test_gate_and_concat_start_as_the_id_embedding_and_learn_from_the_first_step(fusion_class):
    torch.manual_seed(0)
    fusion = fusion_class(8, 5)
    e, t = torch.randn(6, 8, requires_grad=True), torch.randn(6, 5)
    assert torch.equal(fusion(e, t), e)
    sequence = torch.randn(6, 3, 8)
    assert torch.equal(fusion(sequence, t), sequence)
    fused = fusion(e, t)
    (fused * torch.randn(6, 8)).sum().backward()
    grads = [p.grad for p in fusion.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the knowledge can open from step one
    assert not torch.allclose(AttentionFusion(8, 5)(e, t), e)  # the paper's fusion does not start there


def test_fused_embedding_lookup_equals_weight_rows_and_leaves_padding_unfused():
    torch.manual_seed(0)
    table = FusedEmbedding(torch.nn.Embedding(7, 4, padding_idx=0), np.random.rand(6, 3).astype(np.float32),
                           AttentionFusion(4, 3))
    ids = torch.tensor([[0, 3, 6], [5, 1, 0]])
    assert torch.allclose(table(ids), table.weight[ids])
    assert torch.equal(table.weight[0], table.embedding.weight[0])
    assert table.knowledge[6].abs().sum() == 0  # row 6: beyond the knowledge


# --- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_knowledge(tmp_path_factory):
    """One knowledge folder for the module: runs on the same split reuse the behaviour vectors and store."""
    return str(tmp_path_factory.mktemp("reland_knowledge"))


@pytest.fixture
def reland_config(tiny_ranking_config, shared_knowledge):
    config = dict(tiny_ranking_config)
    config.update(knowledge_dir=shared_knowledge,
                  reland_behaviour_epochs=1, reland_behaviour_config={"embedding_size": 8},
                  reland_seed_ratio=0.2, reland_n_clusters=3, hidden_size=8, inner_size=16, n_layers=1, n_heads=1)
    return config


MODELS = ["BPR", "NeuMF", "NGCF", "LightGCN", "GRU4Rec", "SASRec", "BERT4Rec", "NARM"]
SEQUENTIAL = {"GRU4Rec", "SASRec", "BERT4Rec", "NARM"}


def for_model(config, base):
    """RecBole 1.2.1's sequential models train with CE over all items: no negative sampling."""
    return dict(config, train_neg_sample_args=None) if base in SEQUENTIAL else config


@pytest.mark.parametrize("base", MODELS)
def test_every_reland_variant_trains_and_full_sort_evaluates(reland_config, base):
    result = run_recbole_llmk(f"{base}_ReLand", "tiny", config_dict=for_model(reland_config, base))
    assert set(result["test_result"]) == {"hit@10", "ndcg@10"}
    model = result["model"]
    fused = [name for name, m in model.named_children() if isinstance(m, FusedEmbedding)]
    assert any("item" in name for name in fused)
    assert any("user" in name for name in fused) or model.user_fusion is not None
    store = KnowledgeStore.open(result["knowledge_store"])
    assert store.meta["technique"] == "ReLand" and store.meta["generation"]["requested"] == 6  # 20 % of 30 users


def scores_at_initialisation(name, config):
    """``name``'s untrained full-sort scores for the first test batch."""
    config, dataset, train_data, _, test_data = prepare(name, "tiny", config_dict=config)
    build_knowledge(config, train_data)
    model = create_model(config, train_data).eval()
    interaction = next(iter(test_data))[0]
    with torch.no_grad():
        return model.full_sort_predict(interaction)


@pytest.mark.parametrize("base", ["BPR", "SASRec"])
def test_default_fusions_start_as_the_stock_model(reland_config, base):
    """Gate (user) and concat (item) cannot do worse than the ID-only model at initialisation: a
    variant's untrained scores are the stock model's, while the paper's attention fusion moves them."""
    config = for_model(reland_config, base)
    stock = scores_at_initialisation(base, config)
    variant = scores_at_initialisation(f"{base}_ReLand", config)
    attention = scores_at_initialisation(f"{base}_ReLand", dict(config, reland_user_fusion="attention",
                                                                  reland_item_fusion="attention"))
    assert torch.allclose(stock, variant, atol=1e-5)
    assert not torch.allclose(stock, attention, atol=1e-3)


def test_a_fusion_or_control_outside_its_choices_is_refused_before_any_knowledge(reland_config, workdir):
    for setting in ("reland_user_fusion", "reland_item_fusion", "knowledge_control", "reland_retrieval",
                    "distributed_backend"):
        with pytest.raises(ValueError, match=f"{setting}: 'sum' is not one of"):
            prepare("BPR_ReLand", "tiny", config_dict=dict(reland_config, **{setting: "sum"}))
    with pytest.raises(ValueError, match="reland_knowledge_norm: 'sum' is not a positive number"):
        prepare("BPR_ReLand", "tiny", config_dict=dict(reland_config, reland_knowledge_norm="sum"))


def test_ablations_and_unsupported_models(reland_config):
    f_item = run_recbole_llmk("SASRec_ReLand", "tiny", config_dict=dict(
        for_model(reland_config, "SASRec"), reland_user_rationale=False))
    assert f_item["model"].user_fusion is None and isinstance(f_item["model"].item_embedding, FusedEmbedding)
    store = KnowledgeStore.open(f_item["knowledge_store"])  # item text only: no seeds were asked
    assert store.meta["kinds"] == ["item"] and store.meta["generation"]["requested"] == 0
    rationale = run_recbole_llmk("BPR_ReLand", "tiny", config_dict=dict(reland_config, reland_item_text=False))
    assert isinstance(rationale["model"].user_embedding, FusedEmbedding)
    assert isinstance(rationale["model"].item_embedding, torch.nn.Embedding)
    id_only = run_recbole_llmk("BPR_ReLand", "tiny", config_dict=dict(reland_config, reland_user_rationale=False,
                                                                        reland_item_text=False))
    assert id_only["knowledge_store"] is None and isinstance(id_only["model"].user_embedding, torch.nn.Embedding)
    with pytest.raises(ValueError, match="FISM_ReLand is not supported"):
        get_model("FISM_ReLand")
    with pytest.raises(ValueError, match="general and sequential"):
        get_model("DeepFM_ReLand")


def test_knowledge_norm_centres_and_scales_every_row_but_padding():
    rng = np.random.default_rng(0)
    table = np.vstack([np.zeros((1, 8)), 3.0 + rng.normal(size=(50, 8))]).astype(np.float32)
    out = rescaled(table, 0.1)
    assert rescaled(table, None) is table
    assert np.allclose(out[0], 0) and np.allclose(out[1:].mean(0), 0, atol=1e-6)
    assert np.isclose(np.linalg.norm(out[1:], axis=1).mean(), 0.1, rtol=1e-5)
    assert np.allclose(out[1:] / out[1:].std(), (table[1:] - table[1:].mean(0)) / (table[1:] - table[1:].mean(0)).std(),
                       atol=1e-5)  # one scale for every row: the rows' geometry is kept
    assert np.allclose(rescaled(np.vstack([table[:1], np.ones((5, 8), np.float32)]), 0.1), 0)  # constant: no content
    for bad in ("big", 0, -1.0, True):
        with pytest.raises(ValueError, match="reland_knowledge_norm: .* is not a positive number"):
            rescaled(table, bad)


def test_a_model_without_id_tables_is_refused_before_any_knowledge(reland_config, workdir):
    """DIN is a sequential RecBole class of the context type: its item embedding sits inside its
    embedding layer. It used to be refused after the behaviour model's training and the store."""
    import time

    start = time.time()
    with pytest.raises(ValueError, match="DIN_ReLand is not supported: DIN has no item ID embedding table.*"
                                         "Checked before any knowledge was built.*DIN_REKI"):
        run_recbole_llmk("DIN_ReLand", "tiny", config_dict=dict(for_model(reland_config, "DIN"),
                                                                 knowledge_dir=str(workdir / "fresh")))
    assert not any((workdir / "fresh").rglob("*.npz")) and not any((workdir / "fresh").rglob("meta.json"))
    assert time.time() - start < 60


def items_in(text):
    return {m for m in re.findall(r"Title(\d+)", text)}


@pytest.mark.parametrize("base", ["BPR", "SASRec"])  # a random split and a leave-one-out split
def test_no_valid_or_test_item_reaches_a_seed_prompt(reland_config, base):
    config, dataset, train_data, valid_data, test_data = prepare(f"{base}_ReLand", "tiny", config_dict=for_model(reland_config, base))
    train = training_interactions(training_dataset(train_data))
    _, make_plan = reland_requests(config, training_dataset(train_data))
    plan = make_plan()
    assert plan.requests
    for request in plan.requests:
        user = request.key.split(":", 1)[1]
        shown = items_in(request.prompt)
        assert shown and shown <= set(train.loc[train["user"] == user, "item"])


def test_item_text_alone_trains_no_behaviour_encoder_and_serves_every_seed(reland_config, monkeypatch):
    import recbole_llmk.techniques.reland as technique

    def no_encoder(*args):
        raise AssertionError("+f_item needs no behaviour encoder")

    monkeypatch.setattr(technique, "train_behaviour_encoder", no_encoder)
    config, _, train_data, _, _ = prepare("BPR_ReLand", "tiny", config_dict=dict(reland_config, reland_user_rationale=False))
    settings, make_plan = reland_requests(config, training_dataset(train_data))
    plan = make_plan()
    assert not plan.requests and set(plan.layout) == {"item"}
    config["seed"] += 1
    assert reland_requests(config, training_dataset(train_data))[0] == settings


def test_behaviour_encoder_never_trains_on_a_pair_the_run_may_evaluate_on(reland_config, caplog):
    """Exact, not over-strict: a behaviour model may see fewer pairs than the run trains on (a
    sequential split drops some), never one the run's training split lacks: its own split of the
    data may hold such pairs (RecBole's general and sequential leave-one-out splits differ), and
    they are dropped from its training rows."""
    import logging

    from recbole_llmk.knowledge.history import pairs_outside
    from recbole_llmk.knowledge.pretrained import train_on_split

    config, _, train_data, _, _ = prepare("BPR_ReLand", "tiny", config_dict=reland_config)
    frame = training_interactions(training_dataset(train_data))
    held_out = frame.iloc[0]
    with caplog.at_level(logging.INFO):
        _, _, model_data, _ = train_on_split(config, frame.iloc[1:], "LightGCN", {"epochs": 1, "embedding_size": 8})
    seen = training_interactions(training_dataset(model_data))
    assert not pairs_outside(seen, frame.iloc[1:]) and len(seen) == len(frame) - 1
    assert f"1 (user, item) pairs the run's training split lacks (e.g. user {held_out['user']} with item " \
           f"{held_out['item']}); they are dropped" in caplog.text
    extra = pd.DataFrame({"user": ["1"], "item": ["999"]})  # the run trains on a pair the model never sees: safe
    users, items = train_behaviour_encoder(config, pd.concat([frame, extra]))
    assert len(users) and len(items)


def test_recorded_rationales_fill_the_pool_and_explanations(reland_config, workdir):
    config, _, train_data, _, _ = prepare("LightGCN_ReLand", "tiny", config_dict=reland_config)
    requests = reland_requests(config, training_dataset(train_data))[1]().requests
    recording = workdir / "rationales.jsonl"
    with open(recording, "w") as f:
        for number, request in enumerate(requests):
            seed = request.key.split(":", 1)[1]
            answer = (f"**Step 1:** User {seed} likes genre {number}.\n**Step 2:** Recommend Title{number}."
                      if number else "I am not sure.")  # the first one is malformed
            f.write(json.dumps({"prompt": request.prompt, "response": answer}) + "\n")
    result = run_recbole_llmk("LightGCN_ReLand", "tiny", config_dict=dict(
        reland_config, knowledge_dir=str(workdir / "k"), llm_backend="replay", llm_replay_file=str(recording)))
    store = KnowledgeStore.open(result["knowledge_store"])
    pool = [json.loads(line) for line in open(os.path.join(store.path, "reasoning_pool.jsonl"))]
    assert len(pool) == len(requests) == 6 and [p["parsed"] for p in pool].count(False) == 1
    user_texts = set(store.texts("user").values())
    assert {f"Recommend Title{n}." for n in range(1, 6)} <= user_texts  # Step 2 is the knowledge
    assert "I am not sure." in user_texts  # a malformed answer is kept whole, not dropped
    explanations = pd.read_csv(os.path.join(store.path, "explanations.tsv"), sep="\t", dtype=str)
    assert len(explanations) == len(store.texts("user"))
    seeds = {p["seed"] for p in pool}
    assert set(explanations["seed_user"]) <= seeds
    own = explanations[explanations["user"].isin(seeds)]
    assert (own["user"] == own["seed_user"]).all()  # a seed retrieves itself
    assert explanations["summary"].str.contains("likes genre").any()


RELEASE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "shared", "data", "reki", "ml-1m", "proc_data", "group_data")


@pytest.mark.skipif(not os.path.isdir(RELEASE), reason="../shared/data (the REKI release) is absent")
def test_released_user_clusters_form_a_real_reasoning_pool(reland_config, workdir):
    """The tiny dataset's users 1..30 read as ML-1M user ids: each of their liked-items clusters is a seed."""
    from recbole_llmk.knowledge.release_assignment import load_release

    config = dict(reland_config, knowledge_dir=str(workdir / "k"), reland_pool_source="released",
                  reki_release_path=RELEASE, reki_release_match="id")
    result = run_recbole_llmk("LightGCN_ReLand", "tiny", config_dict=config)
    store = KnowledgeStore.open(result["knowledge_store"])
    release = load_release(store.meta | {"reki_release_path": RELEASE, "reki_release_movies": None})
    clusters = {release.user_clusters[str(u)][0] for u in range(1, 31)}
    pool = [json.loads(line) for line in open(os.path.join(store.path, "reasoning_pool.jsonl"))]
    assert {p["seed"] for p in pool} == {f"positive-cluster-{c}" for c in clusters}
    assert store.meta["generation"]["requested"] == len(clusters) and store.meta["generation"]["called"] == 0
    assert store.meta["llm_backend"] == "replay" and "gpt-3.5" in store.meta["llm_model"]
    released = {release.texts[("positive", c)] for c in clusters}
    assert set(store.texts("user").values()) <= released  # real gpt-3.5 text, whole
    assert set(result["test_result"]) == {"hit@10", "ndcg@10"}
