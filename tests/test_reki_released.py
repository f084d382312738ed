"""REKI with the REKI authors' released gpt-3.5 cluster knowledge, on RecBole's bundled ml-100k."""

from pathlib import Path

import pytest
import torch

from recbole_llmk.knowledge.store import KnowledgeStore
from recbole_llmk.quick_start import run_recbole_llmk

RELEASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reki" / "ml-1m" / "proc_data" / "group_data"


@pytest.mark.skipif(not RELEASE.is_dir(), reason="../shared/data (the REKI release) is absent")
def test_released_knowledge_reaches_ml100k_users_and_items(workdir, tiny_encoder):
    config = {"reki_knowledge": "released", "reki_release_path": str(RELEASE), "text_encoder": tiny_encoder,
              "knowledge_dir": str(workdir / "knowledge"), "checkpoint_dir": str(workdir / "saved"),
              "epochs": 1, "show_progress": False, "state": "WARNING", "embedding_size": 8}
    result = run_recbole_llmk("DeepFM_REKI", "ml-100k", config_dict=config)
    store = KnowledgeStore.open(result["knowledge_store"])
    generation = store.meta["generation"]
    assert (generation["requested"], generation["called"], generation["failed"]) == (377, 0, 0)  # replayed, 0 misses
    assert store.meta["llm_model"] == "gpt-3.5-turbo-0613"
    assert store.meta["knowledge_kinds"] == {"user": ["user_positive", "user_negative", "user_history"],
                                             "item": ["item_cluster", "item_description"]}
    tokens, _ = store.vectors("item_cluster")
    assert len(tokens) == 496  # ml-100k movies the release places (by title + year, see reki_release)
    assert len(store.vectors("user_positive")[0]) > 900
    texts = store.texts("item_cluster")
    assert all(len(text) > 100 for text in texts.values())  # real completions, not descriptions
    hein = result["model"].knowledge.hein
    # users: 3 kinds x 16 dims, items: 2 x 16; the wider side is projected to the narrower
    assert (hein.user_in.in_features, hein.user_in.out_features) == (3 * 16, 2 * 16)
    assert isinstance(hein.item_in, torch.nn.Identity)
    assert set(result["test_result"]) == {"auc", "logloss"}
