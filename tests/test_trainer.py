"""The plugin's trainer: a run killed mid-way and resumed from its file ends where an unbroken run
ends; sampled evaluation scores against fixed negatives; RecBole's beyond-accuracy metrics evaluate."""

import numpy as np
import pytest
import torch
from recbole.trainer import Trainer

from recbole_llmk.quick_start import build_knowledge, create_model, prepare
from recbole_llmk.utils import get_trainer

EPOCHS = 4


class Killed(Exception):
    pass


@pytest.fixture
def config(tiny_config):
    # dropout and shuffling make every epoch draw random numbers, which a resume must replay
    return dict(tiny_config, epochs=EPOCHS, stopping_step=EPOCHS, eval_step=1, dropout_prob=0.3,
                shuffle=True, train_batch_size=32, llm_backend="none")


def make_trainer(config, resume_file=None, key="run", kill_at=None):
    config, _, train_data, valid_data, test_data = prepare("DeepFM_REKI", "tiny", config_dict=config)
    build_knowledge(config, train_data)
    trainer = get_trainer(config)(config, create_model(config, train_data))
    trainer.resume_file, trainer.resume_key = resume_file, key
    if kill_at is not None:
        train_epoch = trainer._train_epoch

        def killed_at(data, epoch_idx, *args, **kwargs):
            if epoch_idx == kill_at:
                raise Killed
            return train_epoch(data, epoch_idx, *args, **kwargs)

        trainer._train_epoch = killed_at
    return trainer, train_data, valid_data, test_data


def train(config, **kwargs):
    trainer, train_data, valid_data, test_data = make_trainer(config, **kwargs)
    best = trainer.fit(train_data, valid_data, saved=True)
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}  # before the best model is loaded back
    return trainer, trained, best, trainer.evaluate(test_data, load_best_model=True)


def kill_then_resume(config, resume_file, kill_at=2):
    trainer, train_data, valid_data, _ = make_trainer(config, resume_file, kill_at=kill_at)
    with pytest.raises(Killed):
        trainer.fit(train_data, valid_data, saved=True)
    return train(config, resume_file=resume_file)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_ends_with_the_weights_and_results_of_an_unbroken_one(config, workdir):
    _, weights, best, test = train(config)
    resumed, resumed_weights, resumed_best, resumed_test = kill_then_resume(config, str(workdir / "run.resume"))

    assert resumed.resumed_after == [1] and len(resumed.epoch_seconds) == EPOCHS
    assert same_weights(weights, resumed_weights)
    assert resumed_best == best and resumed_test == test


def test_resuming_without_the_random_states_would_not_match(config, workdir, monkeypatch):
    """What makes the test above able to fail: the epochs after a resume draw random numbers."""
    _, weights, _, _ = train(config)
    monkeypatch.setattr("recbole_llmk.trainer.set_random_states", lambda states, data: None)
    _, resumed_weights, _, _ = kill_then_resume(config, str(workdir / "run.resume"))
    assert not same_weights(weights, resumed_weights)


def test_a_finished_run_resumes_to_its_result_without_training(config, workdir):
    resume_file = str(workdir / "run.resume")
    first, _, best, test = train(config, resume_file=resume_file)
    again, _, again_best, again_test = train(config, resume_file=resume_file)
    assert again.epoch_seconds == first.epoch_seconds  # no epoch trained this time
    assert again_best == best and again_test == test


def test_a_state_of_another_run_is_refused(config, workdir):
    resume_file = str(workdir / "run.resume")
    train(config, resume_file=resume_file)
    trainer, train_data, valid_data, _ = make_trainer(config, resume_file, key="another config")
    with pytest.raises(ValueError, match="another run.*delete it"):
        trainer.fit(train_data, valid_data)


@pytest.mark.parametrize("kill_at", [1, 3])
def test_epochs_between_evaluations_are_saved_too(config, workdir, kill_at):
    """eval_step 2: epochs 0 and 2 are not evaluated; a kill in epoch 1 (before any best model
    exists) or 3 loses only that epoch."""
    config = dict(config, eval_step=2)
    _, weights, best, test = train(config)
    resumed, resumed_weights, resumed_best, resumed_test = kill_then_resume(config, str(workdir / "run.resume"), kill_at)
    assert resumed.resumed_after == [kill_at - 1] and len(resumed.epoch_seconds) == EPOCHS
    assert same_weights(weights, resumed_weights)
    assert resumed_best == best and resumed_test == test


def sampled_run(tiny_ranking_config, fixed):
    config = dict(tiny_ranking_config)
    config.update(eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni10"},
                  metrics=["AUC"], valid_metric="AUC", eval_fixed_negatives=fixed, train_batch_size=32)
    config, _, train_data, _, test_data = prepare("BPR", "tiny", config_dict=config)
    trainer = get_trainer(config)(config, create_model(config, train_data))
    return trainer, test_data


@pytest.mark.parametrize("fixed", [True, False])
def test_sampled_evaluation_scores_against_the_same_negatives_whatever_came_before(tiny_ranking_config, fixed):
    """uni10 on a stock model: with eval_fixed_negatives the result does not depend on numpy's
    generator before the evaluation (other epochs, another model's knowledge building), and the
    generator is given back untouched; RecBole's own behaviour (False) draws other negatives."""
    import numpy as np

    trainer, test_data = sampled_run(tiny_ranking_config, fixed)
    results = []
    for seed in (1, 2):
        np.random.seed(seed)
        before = np.random.get_state()[1].copy()
        results.append(trainer.evaluate(test_data, load_best_model=False)["auc"])
        assert (np.random.get_state()[1] == before).all() == fixed
    assert (results[0] == results[1]) == fixed


BEYOND_ACCURACY = ["AveragePopularity", "ItemCoverage", "GiniIndex", "ShannonEntropy", "TailPercentage"]


@pytest.fixture
def ranking_config(tiny_ranking_config):
    return dict(tiny_ranking_config, load_col={"inter": ["user_id", "item_id", "timestamp"]}, epochs=2, topk=[5],
                eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
                metrics=["Hit", "NDCG", *BEYOND_ACCURACY], valid_metric="NDCG@5")


def test_beyond_accuracy_metrics_evaluate_as_recbole_defines_them(ranking_config):
    """RecBole 1.2.1's own trainer dies on these metrics (its collector calls .cpu() on the training
    split's item counts); the plugin's evaluates them, and AveragePopularity@5 is the mean training
    count of each test user's top 5, recomputed here from the model's own ranking."""
    from recbole.utils.case_study import full_sort_topk

    config, _, train_data, valid_data, test_data = prepare("BPR", "tiny", config_dict=ranking_config)
    trainer = get_trainer(config)(config, create_model(config, train_data))
    trainer.fit(train_data, valid_data, saved=False)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert 0 < result["itemcoverage@5"] <= 1 and 0 <= result["giniindex@5"] <= 1
    users = np.unique(test_data._dataset.inter_feat["user_id"].numpy())
    _, top = full_sort_topk(users, trainer.model, test_data, 5)
    counts = train_data._dataset.item_counter
    expected = np.mean([np.mean([counts.get(int(i), 0) for i in row]) for row in top])
    assert result["averagepopularity@5"] == pytest.approx(expected, rel=1e-4)

    config, _, train_data, valid_data, _ = prepare("BPR", "tiny", config_dict=ranking_config)
    with pytest.raises(AttributeError, match="cpu"):  # RecBole's issues 2191 and 2194
        Trainer(config, create_model(config, train_data)).fit(train_data, valid_data, saved=False)
