"""Shared fixtures: a tiny synthetic RecBole dataset and a tiny random-weight text encoder.

Nothing here downloads anything. RecBole's Config reads ``sys.argv`` and RecBole writes logs
under the working directory, so every test runs with a clean argv inside a temporary folder.
"""

import os
import sys

import numpy as np
import pytest

DATASET = "tiny"
N_USERS, N_ITEMS, PER_USER = 30, 40, 24
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


def write_tiny_dataset(root, name=DATASET, seed=0):
    """Atomic files shaped like ml-100k: ratings with timestamps, user and item features.

    Item titles are ``Title<id>`` so a test can find every item a prompt mentions."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(1, N_USERS + 1):
            items = rng.choice(np.arange(1, N_ITEMS + 1), size=PER_USER, replace=False)
            taste = u % len(GENRES)
            for t, i in enumerate(items):
                liked = (i % len(GENRES)) == taste
                rating = int(np.clip(rng.integers(1, 4) + 2 * liked, 1, 5))
                f.write(f"{u}\t{i}\t{rating}\t{1000 + 10 * t + u}\n")
    with open(os.path.join(folder, f"{name}.user"), "w") as f:
        f.write("user_id:token\tage:token\tgender:token\toccupation:token\n")
        for u in range(1, N_USERS + 1):
            f.write(f"{u}\t{20 + u % 40}\t{'MF'[u % 2]}\t{['student', 'artist', 'doctor'][u % 3]}\n")
    with open(os.path.join(folder, f"{name}.item"), "w") as f:
        f.write("item_id:token\ttitle:token_seq\tyear:token\tgenre:token_seq\n")
        for i in range(1, N_ITEMS + 1):
            f.write(f"{i}\tTitle{i} Story\t{1980 + i % 30}\t{GENRES[i % len(GENRES)]}\n")
    return root


def write_tiny_encoder(path):
    """A 2-layer random-weight BERT with a word-level tokenizer, saved like a real model folder.
    Its vocabulary knows the tiny dataset's titles, genres, years and user attributes, so texts
    about different users and items encode to different vectors (with only unknown words every
    description would encode alike, and no test could tell one id's knowledge from another's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    domain = [f"Title{i}" for i in range(1, N_ITEMS + 1)] + GENRES + [str(n) for n in range(1, 2100)]
    domain += ["student", "artist", "doctor", "M", "F", "Story"]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(200)] + domain
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(path)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    return write_tiny_encoder(str(tmp_path_factory.mktemp("encoder")))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    write_tiny_dataset(str(tmp_path / "data"))
    return tmp_path


@pytest.fixture
def tiny_config(workdir, tiny_encoder):
    """Config dict for a fast run on the tiny dataset (context-aware defaults: labeled, AUC)."""
    return {
        "data_path": str(workdir / "data"),
        "checkpoint_dir": str(workdir / "saved"),
        "knowledge_dir": str(workdir / "knowledge"),
        "text_encoder": tiny_encoder,
        "threshold": {"rating": 4},
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                     "user": ["user_id", "age", "gender", "occupation"], "item": ["item_id", "year", "genre"]},
        "epochs": 1,
        "train_batch_size": 128,
        "eval_batch_size": 256,
        "embedding_size": 8,
        "mlp_hidden_size": [16, 16],
        "hein_hidden_sizes": [16, 8],
        "show_progress": False,
        "state": "WARNING",
        # RECBOLE_LLMK_TEST_GPU=1 runs the same tests on the GPU path (a GPU machine, not CI)
        "use_gpu": os.environ.get("RECBOLE_LLMK_TEST_GPU") == "1",
        "seed": 2020,
        "reproducibility": True,
    }


@pytest.fixture
def tiny_ranking_config(tiny_config):
    """The tiny config as a ranking run: every interaction a positive (no rating ``threshold``),
    Hit and NDCG at 10, validated on NDCG@10."""
    config = {k: v for k, v in tiny_config.items() if k != "threshold"}
    return dict(config, metrics=["Hit", "NDCG"], topk=[10], valid_metric="NDCG@10")
