"""RecBole's distributed training through the plugin, on CPUs: two gloo processes train one model."""

import socket

import pytest

from recbole_llmk.distributed import backend_of
from recbole_llmk.quick_start import run_recbole_llmk


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


SEQUENTIAL = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
              "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "hidden_size": 8, "inner_size": 16,
              "n_layers": 1, "n_heads": 1, "train_neg_sample_args": None}


@pytest.mark.parametrize("model", ["DeepFM_REKI", "GRU4Rec_REKI"])
def test_two_cpu_processes_train_one_model_on_one_store(tiny_config, model):
    config = {k: v for k, v in tiny_config.items() if k != "threshold" or model == "DeepFM_REKI"}
    if model != "DeepFM_REKI":
        config.update(SEQUENTIAL)
    config.update(epochs=2, use_gpu=False)
    one = run_recbole_llmk(model, "tiny", config_dict=dict(config))
    two = run_recbole_llmk(model, "tiny", config_dict=dict(config), nproc=2, port=free_port())
    assert two["world_size"] == 2 and two["replicas_in_sync"] is True  # gradients averaged every step
    assert two["knowledge_store"] == one["knowledge_store"]  # built once, read by both ranks
    assert set(two["test_result"]) == set(one["test_result"])
    for metric, value in one["test_result"].items():
        # each rank reads half of every batch in another order, and metrics are averaged over ranks
        assert abs(two["test_result"][metric] - value) < 0.25, (metric, value, two["test_result"][metric])


def test_the_backend_is_nccl_only_where_cuda_is():
    assert backend_of({"gpu_id": ""}) == "gloo"
    assert backend_of({"distributed_backend": "gloo", "gpu_id": "0"}) == "gloo"
    with pytest.raises(ValueError, match="distributed_backend must be one of"):
        backend_of({"distributed_backend": "mpi"})


def perturbed_rank(rank, port, queue):
    import torch
    import torch.distributed as dist

    from recbole_llmk.distributed import replicas_in_sync

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    same = replicas_in_sync(model)
    with torch.no_grad():
        model.weight[0, 0] += rank  # rank 1 drifts
    queue.put((rank, same, replicas_in_sync(model)))
    dist.destroy_process_group()


def test_replicas_that_differ_are_caught():
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(perturbed_rank, args=(free_port(), queue), nprocs=2, join=True)
    answers = sorted(queue.get() for _ in range(2))
    assert answers == [(0, True, False), (1, True, False)]
