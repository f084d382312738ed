"""RecBole's distributed training (``nproc``, ``world_size``, ``ip``, ``port``, ``group_offset``),
on GPUs as RecBole does it and on CPUs too.

RecBole 1.2.1 starts one process per device (``torch.multiprocessing.spawn``), joins them with
``init_process_group(backend="nccl")`` and wraps the model in ``DistributedDataParallel(model,
device_ids=[local_rank])``: NCCL and those device ids exist on GPUs only, so it cannot run on a
CPU at all. Here a run without GPUs (or with ``distributed_backend: gloo``) joins with gloo and
wraps the model without device ids; on GPUs it stays RecBole's own. Everything else is RecBole's:
each rank reads its share of every batch (``DistributedSampler``), gradients are averaged across
ranks each step, evaluation metrics are averaged over ranks weighted by their users or rows
(RecBole's ``_map_reduce``; for AUC, a mean of per-rank AUCs, not one AUC over all rows).

Knowledge is built by one rank: the store's lock lets the first build it while the others wait,
then they all read it (no prompt is sent twice). At the end every rank checks that its weights
equal rank 0's (``replicas_in_sync`` in the results).
"""

import logging

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

BACKENDS = ("nccl", "gloo")


def is_distributed(config):
    return not config["single_spec"]


def backend_of(config_dict):
    """``distributed_backend`` if set, else RecBole's NCCL where CUDA is, gloo where it is not."""
    chosen = config_dict.get("distributed_backend")
    if chosen is not None:
        if chosen not in BACKENDS:
            raise ValueError(f"distributed_backend must be one of {BACKENDS}, got '{chosen}'")
        return chosen
    return "nccl" if torch.cuda.is_available() and str(config_dict.get("gpu_id", "")) != "" else "gloo"


def join_on_cpu(config_dict):
    """What RecBole's ``Config._init_device`` does for a distributed run, with gloo on CPUs."""
    config_dict["gpu_id"] = ""
    dist.init_process_group(backend="gloo", rank=config_dict["local_rank"] + config_dict["offset"],
                            world_size=config_dict["world_size"],
                            init_method=f"tcp://{config_dict['ip']}:{config_dict['port']}")
    config_dict["device"] = torch.device("cpu")
    config_dict["single_spec"] = False
    if config_dict["local_rank"] != 0:  # as RecBole: one rank speaks
        config_dict.update(state="error", show_progress=False, verbose=False)


class DistributedTrainerMixin:
    """Trainer mixin for distributed runs. On CPUs, ``DistributedDataParallel`` without device ids
    (RecBole's trainer passes ``device_ids=[local_rank]``, which only GPU modules accept). On any
    device, every rank names the best model as rank 0 does (RecBole names it by the second each
    rank built its trainer, and only rank 0 saves it) and waits after ``fit`` until rank 0 has
    written it, so every rank tests the same weights."""

    def __init__(self, config, model):
        if not is_distributed(config):
            super().__init__(config, model)
            return
        if config["device"].type == "cpu":
            config["single_spec"] = True  # RecBole's AbstractTrainer wraps the model only when this is False
            try:
                super().__init__(config, model)
            finally:
                config["single_spec"] = False
            self.distributed_model = DistributedDataParallel(self.model)
        else:
            super().__init__(config, model)
        names = [self.saved_model_file]
        dist.broadcast_object_list(names, src=0)
        self.saved_model_file = names[0]

    def fit(self, *args, **kwargs):
        result = super().fit(*args, **kwargs)
        if is_distributed(self.config):
            dist.barrier()
        return result


def replicas_in_sync(model):
    """Whether every rank holds rank 0's weights (gradients averaged each step keep them equal)."""
    device = torch.device("cpu") if dist.get_backend() == "gloo" else next(model.parameters()).device
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).to(device)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([int(torch.equal(flat, reference))], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not same.item():
        logging.getLogger().error("distributed training: the ranks' weights differ at the end of training")
    return bool(same.item())


def finish(config):
    if is_distributed(config) and dist.is_initialized():
        dist.destroy_process_group()
