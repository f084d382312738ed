"""LEARN: content embeddings from a frozen encoder, causal towers, all-action InfoNCE, full-sort
evaluation through RecBole's trainer and evaluator; UAUC/WUAUC metrics."""

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import GENRES
from recbole_llmk.knowledge.store import KnowledgeStore
from recbole_llmk.metrics import register_metrics
from recbole_llmk.model.learn import all_action_infonce, split_window
from recbole_llmk.quick_start import build_knowledge, create_model, prepare, run_recbole_llmk


@pytest.fixture
def learn_config(tiny_config):
    """The tiny CTR config turned into LEARN's sequential full-sort setting (no threshold)."""
    config = {k: v for k, v in tiny_config.items() if k not in ("threshold", "embedding_size")}
    config.update({
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Recall", "NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10",
        "train_batch_size": 64, "MAX_ITEM_LIST_LENGTH": 20,
        "learn_history_len": 8, "learn_target_len": 4, "hidden_size": 16, "inner_size": 32,
        "embedding_size": 8,
    })
    return config


def build(config_dict, dataset="tiny"):
    config, _, train_data, valid_data, test_data = prepare("LEARN", dataset, config_dict=config_dict)
    build_knowledge(config, train_data)
    model = create_model(config, train_data).eval()
    return config, train_data, valid_data, test_data, model


def test_user_embedding_is_causal(learn_config):
    *_, model = build(learn_config)
    model.content[1:] = torch.randn_like(model.content[1:])  # the tiny encoder reads every title as [UNK]
    history = torch.tensor([[3, 5, 7, 9, 11, 0, 0, 0], [2, 4, 6, 8, 10, 12, 14, 16]], device=model.device)
    changed = history.clone()
    changed[:, 3:] = torch.tensor([[20, 21, 0, 0, 0], [22, 23, 24, 25, 26]], device=model.device)
    with torch.no_grad():
        before, after = model.user_tower(history), model.user_tower(changed)
    assert torch.equal(before[:, :3], after[:, :3])  # positions 0..2 never see positions 3..
    assert not torch.allclose(before[:, 3], after[:, 3])


def infonce_by_loops(users, user_valid, items, item_ids, item_valid, tau, owners, log_q):
    """LEARN's loss written as its definition: every (user, position, own target) triple against
    the other users' targets that are not one of its own."""
    total, count = 0.0, 0
    n_users, n_positions = user_valid.shape

    def score(u, i, v, k):
        return float(users[u, i] @ items[v, k]) / tau - float(log_q[item_ids[v, k]])

    for u in range(n_users):
        own = {int(x) for x, valid in zip(item_ids[u], item_valid[u]) if valid}
        for i in range(n_positions):
            if not user_valid[u, i]:
                continue
            negatives = [score(u, i, v, k) for v in range(n_users) if owners[v] != owners[u]
                         for k in range(item_ids.shape[1]) if item_valid[v, k] and int(item_ids[v, k]) not in own]
            for j in range(item_ids.shape[1]):
                if item_valid[u, j]:
                    positive = score(u, i, u, j)
                    total += -math.log(math.exp(positive) / (math.exp(positive) + sum(math.exp(n) for n in negatives)))
                    count += 1
    return total / count


def test_all_action_infonce_matches_a_double_loop():
    torch.manual_seed(0)
    users, items = torch.randn(3, 4, 5), torch.randn(3, 2, 5)
    user_valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    item_ids = torch.tensor([[7, 8], [9, 7], [3, 0]])  # item 7 is a target of users 0 and 1
    batch = (users, user_valid, items, item_ids, item_ids > 0, 0.5)
    no_q = torch.zeros(10)
    loss = all_action_infonce(*batch)
    assert loss.item() == pytest.approx(infonce_by_loops(*batch, [0, 1, 2], no_q), rel=1e-5)
    # rows 0 and 2 as two windows of one user: neither's targets are the other's negatives
    owned = all_action_infonce(*batch, owners=torch.tensor([5, 6, 5]))
    assert owned.item() == pytest.approx(infonce_by_loops(*batch, [5, 6, 5], no_q), rel=1e-5)
    # logQ: every score of item k less log_q[k]; a constant log_q changes nothing
    log_q = torch.log(torch.linspace(0.05, 0.5, 10))
    corrected = all_action_infonce(*batch, log_q=log_q)
    assert corrected.item() == pytest.approx(infonce_by_loops(*batch, [0, 1, 2], log_q), rel=1e-5)
    assert corrected.item() != pytest.approx(loss.item())
    assert all_action_infonce(*batch, log_q=torch.full((10,), -2.0)).item() == pytest.approx(loss.item(), rel=1e-5)


def test_split_window_splits_by_time():
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0, 0]])
    history, h, targets, t = split_window(seq, torch.tensor([9, 1, 4]), torch.tensor([10, 2, 5]), 4, 2)
    # windows of 10, 2 and 5 items: full H=4 + T=2; one of each; floor(5*2/6) = 1 target
    assert history.tolist() == [[5, 6, 7, 8], [1, 0, 0, 0], [1, 2, 3, 4]]
    assert targets.tolist() == [[9, 10], [2, 0], [5, 0]]
    assert h.tolist() == [4, 1, 4] and t.tolist() == [2, 1, 1]


def test_item_tower_3_uses_content_embeddings_unchanged(learn_config):
    config, train_data, *_, model = build(dict(learn_config, item_tower=3))
    store = KnowledgeStore.open(config["knowledge_store"])
    dataset = train_data._dataset
    expected = torch.from_numpy(store.aligned("item", dataset, dataset.iid_field)).to(model.device)
    assert torch.equal(model.item_embeddings(), expected)
    targets = torch.tensor([[1, 4, 9]], device=model.device)
    assert torch.equal(model.target_tower(targets), expected[targets])
    batch = next(iter(train_data)).to(model.device)
    assert model.full_sort_predict(batch).shape == (len(batch), dataset.item_num)
    assert torch.isfinite(model.calculate_loss(batch))


def test_item_tower_2_trains_items_as_it_evaluates_them(learn_config):
    *_, model = build(dict(learn_config, item_tower=2))
    targets = torch.tensor([[4, 9, 2, 0]], device=model.device)
    with torch.no_grad():
        trained = model.target_tower(targets)[0, :3]
        evaluated = model.item_embeddings()[targets[0, :3]]
    torch.testing.assert_close(trained, evaluated)


def test_learn_trains_and_full_sort_evaluates(learn_config):
    config = dict(learn_config, metrics=["Recall", "NDCG", "Hit", "UAUC", "WUAUC"], topk=[5, 10])
    result = run_recbole_llmk("LEARN", "tiny", config_dict=config)
    expected = {f"{m}@{k}" for m in ("recall", "ndcg", "hit") for k in (5, 10)} | {"uauc", "wuauc"}
    assert set(result["test_result"]) == expected
    assert 0.0 <= result["test_result"]["uauc"] <= 1.0
    # leave-one-out: one positive per user, so both AUCs agree
    assert result["test_result"]["uauc"] == result["test_result"]["wuauc"]
    assert math.isfinite(result["trainer"].train_loss_dict[0]) and result["trainer"].train_loss_dict[0] > 0
    vectors = os.path.join(result["knowledge_store"], "item.vectors.npy")
    assert json.load(open(os.path.join(result["knowledge_store"], "meta.json")))["technique"] == "LEARN"
    built = os.path.getmtime(vectors)
    # a second run reuses the stored content embeddings instead of encoding again
    again = run_recbole_llmk("LEARN", "tiny", config_dict=config, run="knowledge")
    assert again["knowledge_store"] == result["knowledge_store"] and os.path.getmtime(vectors) == built


def test_cold_items_get_embeddings_from_text(learn_config, workdir):
    item_file = workdir / "data" / "tiny" / "tiny.item"
    with open(item_file, "a") as f:
        f.write("999\tNever Watched Story\t1999\tDrama\n")
    config, train_data, *_, model = build(learn_config)
    dataset = train_data._dataset
    cold = dataset.token2id(dataset.iid_field, "999")
    assert (dataset.inter_feat[dataset.iid_field] != cold).all()
    assert KnowledgeStore.open(config["knowledge_store"]).texts("item")["999"].startswith("title: Never Watched")
    assert model.content[cold].abs().sum() > 0
    with torch.no_grad():
        assert model.item_embeddings()[cold].abs().sum() > 0
        batch = next(iter(train_data)).to(model.device)
        assert torch.isfinite(model.full_sort_predict(batch)[:, cold]).all()


def test_tiled_windows_make_every_training_interaction_a_target_once_an_epoch(learn_config):
    from recbole_llmk.knowledge.history import training_interactions

    config, train_data, valid_data, test_data, model = build(dict(learn_config, learn_windows="tiled"))
    dataset = train_data._dataset
    frame = training_interactions(dataset).sort_values(["user", "timestamp"], kind="stable")
    expected = {}
    for user, items in frame.groupby("user", sort=False)["item"]:
        expected[int(dataset.token2id(dataset.uid_field, user))] = [
            int(dataset.token2id(dataset.iid_field, i)) for i in items]
    assert {u: list(items) for u, items in model.sequences} == expected
    model.train()
    for epoch in range(2):
        targets_seen = []
        for _ in range(model.batches_per_epoch):
            owners, history, targets = model.tiled_samples()
            for owner, hist, tgt in zip(owners.tolist(), history.tolist(), targets.tolist()):
                sequence = expected[owner]
                tgt = [i for i in tgt if i]
                start = next(k for k in range(1, len(sequence)) if sequence[k:k + len(tgt)] == tgt)
                assert [i for i in hist if i] == sequence[max(0, start - model.history_len):start]
                targets_seen += [(owner, i) for i in tgt]
        assert sorted(targets_seen) == sorted((u, i) for u, items in expected.items() for i in items[1:])
    result = run_recbole_llmk("LEARN", "tiny", config_dict=dict(learn_config, learn_windows="tiled", learn_logq=True,
                                                                epochs=1))
    assert result["model"].log_q.shape == (41,) and torch.isfinite(result["model"].log_q).all()
    assert set(result["test_result"]) >= {"ndcg@10", "hit@10"}


def test_training_samples_use_the_training_split_only(learn_config):
    _, train_data, valid_data, test_data, model = build(dict(learn_config, learn_window_rate=1.0))
    dataset = train_data._dataset
    training_items = {}
    for user, item in zip(dataset.inter_feat[dataset.uid_field].tolist(), dataset.inter_feat[dataset.iid_field].tolist()):
        training_items.setdefault(user, set()).add(item)
    for row_user, seq, seq_len in zip(dataset.inter_feat[dataset.uid_field].tolist(),
                                      dataset.inter_feat[model.ITEM_SEQ].tolist(),
                                      dataset.inter_feat[model.ITEM_SEQ_LEN].tolist()):
        training_items[row_user].update(seq[:seq_len])
    held_out = {}
    for data in (valid_data, test_data):
        inter = data._dataset.inter_feat
        for user, item in zip(inter[dataset.uid_field].tolist(), inter[dataset.iid_field].tolist()):
            held_out.setdefault(user, set()).add(item)
    seen_users = set()
    for batch in train_data:
        users, history, _, targets, _ = model.training_samples(batch.to(model.device))
        assert len(set(users.tolist())) == len(users)  # one window per user and batch
        for user, hist, tgt in zip(users.tolist(), history.tolist(), targets.tolist()):
            used = {i for i in hist + tgt if i}
            assert used <= training_items[user]
            assert not used & held_out[user], f"user {user}: a valid/test item became training data"
            seen_users.add(user)
    assert seen_users == set(held_out)


def test_uauc_and_wuauc_on_a_hand_made_example():
    from recbole.evaluator import Collector, Evaluator

    register_metrics()
    config = {"metrics": ["UAUC", "WUAUC", "GAUC"], "topk": [1], "device": "cpu", "eval_args": {"mode": "full"},
              "metric_decimal_place": 6}
    inf = float("-inf")
    # column 0 is the padding item, scored -inf as RecBole's full-sort evaluation does
    scores = torch.tensor([[inf, 0.9, 0.1, 0.5, 0.8, 0.7],
                           [inf, 0.2, 0.2, 0.8, 0.2, 0.1],
                           [inf, 0.4, 0.3, 0.2, 0.1, inf]])  # item 5 masked for user 2 (history)
    positive_u, positive_i = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([2, 4, 2, 3, 1])
    collector = Collector(config)
    collector.eval_batch_collect(scores, None, positive_u, positive_i)
    result = Evaluator(config).evaluate(collector.get_data_struct())
    aucs, weights = [], []
    for u in range(3):
        items = [i for i in range(1, 6) if scores[u, i] > inf]
        pos = [i for i, pu in zip(positive_i.tolist(), positive_u.tolist()) if pu == u]
        neg = [i for i in items if i not in pos]
        pairs = [1.0 if scores[u, p] > scores[u, n] else 0.5 if scores[u, p] == scores[u, n] else 0.0
                 for p in pos for n in neg]
        aucs.append(sum(pairs) / len(pairs))
        weights.append(len(pos))
    # user 0: item 4 beats items 3 and 5, item 2 beats none; user 1: item 2 ties items 1 and 4
    assert aucs == pytest.approx([2 / 6, 5 / 6, 1.0])
    assert result["uauc"] == pytest.approx(np.mean(aucs), abs=1e-6)
    assert result["wuauc"] == pytest.approx(np.average(aucs, weights=weights), abs=1e-6)
    assert result["wuauc"] == pytest.approx(result["gauc"], abs=1e-6)  # weighting by positives is GAUC


def write_tiny_decoder(path):
    """A 1-layer random-weight GPT-2 whose tokenizer has no pad token (as decoder LLMs ship)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", ":", ";", "title", "year", "genre", "Story"] + [f"w{i}" for i in range(10)]
    words += [f"Title{i}" for i in range(1, 41)] + [str(y) for y in range(1980, 2010)] + GENRES
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>",
                                   padding_side="left")
    fast.save_pretrained(path)
    config = GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                        bos_token_id=1, eos_token_id=1)
    GPT2Model(config).save_pretrained(path)
    return path


def test_a_decoder_llm_encodes_item_text(learn_config, tmp_path):
    from recbole_llmk.knowledge.encoder import TextEncoder

    decoder = write_tiny_decoder(str(tmp_path / "gpt2"))
    encoder = TextEncoder(decoder, batch_size=4)
    batch = encoder.encode(["w1 w2 w3", "w4", "w5 w6 w7 w8 w9"])
    alone = encoder.encode(["w4"])
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)  # padding does not change a text's vector
    config, train_data, *_, model = build(dict(learn_config, text_encoder=decoder))
    meta = KnowledgeStore.open(config["knowledge_store"]).meta
    assert meta["encoder"] == decoder and meta["dims"] == {"item": 16}
    content = model.content[1:]
    assert content.abs().sum(1).min() > 0
    assert torch.cdist(content, content).fill_diagonal_(1.0).min() > 1e-3  # every title reads differently


def learn_features_config(tiny_config):
    return dict(tiny_config, learn_features_epochs=1, learn_features_config={
        "embedding_size": 8, "hidden_size": 16, "inner_size": 16, "n_layers": 1, "n_heads": 1,
        "learn_history_len": 5, "learn_target_len": 3, "train_batch_size": 64})


def test_din_learn_trains_on_learn_embeddings_from_the_same_split(tiny_config):
    from recbole_llmk.knowledge.store import KnowledgeStore

    result = run_recbole_llmk("DIN_LEARN", "tiny", config_dict=learn_features_config(tiny_config))
    assert set(result["test_result"]) == {"auc", "logloss"}
    store = KnowledgeStore.open(result["knowledge_store"])
    assert store.meta["technique"] == "LEARN-features" and store.meta["dims"] == {"user": 8, "item": 8}
    tokens, vectors = store.vectors("item")
    assert len(tokens) == 40 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)  # cos space
    assert result["model"].knowledge.user_knowledge.shape == (31, 8)


def test_learn_features_need_a_time_ordered_split(tiny_config):
    with pytest.raises(ValueError, match="time-ordered"):
        run_recbole_llmk("DeepFM_LEARN", "tiny", config_dict=learn_features_config(tiny_config))
    ordered = dict(learn_features_config(tiny_config),
                   eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "labeled"})
    assert set(run_recbole_llmk("DeepFM_LEARN", "tiny", config_dict=ordered)["test_result"]) == {"auc", "logloss"}
