"""Quick start: RecBole's Config, dataset, trainer and evaluator, with knowledge added.

``run_recbole_llmk`` mirrors ``recbole.quick_start.run_recbole`` step by step; the only additions
are resolving plugin models, building the technique's knowledge from the training split before
the model is created, and weights-only-safe checkpoints. It does not import ray.
"""

import logging
import sys
import time

from recbole.utils import init_logger, init_seed, set_color
import torch.distributed as dist

from recbole_llmk.compat import make_run_folders, set_process_modes
from recbole_llmk.config import LLMKConfig
from recbole_llmk.defaults import setting
from recbole_llmk.distributed import finish, is_distributed, replicas_in_sync
from recbole_llmk.logs import protect_logs
from recbole_llmk.utils import create_dataset, data_preparation, get_trainer


def prepare(model=None, dataset=None, config_file_list=None, config_dict=None):
    """Config, dataset and split exactly as RecBole builds them for the (base) model."""
    config = LLMKConfig(model, dataset, config_file_list, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    set_process_modes(config)
    make_run_folders(config)
    init_logger(config)
    protect_logs(config)
    logger = logging.getLogger()
    logger.info(sys.argv)
    for warning in config.startup_warnings:
        logger.warning(warning)
    logger.info(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return config, dataset, train_data, valid_data, test_data


def build_knowledge(config, train_data):
    """Build (or reuse) the knowledge store the configured model needs; None for stock models."""
    prepare_knowledge = getattr(config.model_class, "prepare_knowledge", None)
    return prepare_knowledge(config, train_data) if prepare_knowledge else None


def create_model(config, train_data):
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = config.model_class(config, train_data._dataset).to(config["device"])
    logging.getLogger().info(model)
    return model


def batch_files(config, train_data, run):
    """Export the knowledge prompts not yet answered as an OpenAI Batch / vLLM run-batch file
    (``run='export_batch'``), or import such a job's results into the answer cache
    (``run='import_batch'``); both at ``batch_file``. The next run then sends nothing for them."""
    from recbole_llmk.knowledge.batch_files import export_batch, import_batch
    from recbole_llmk.knowledge.pipeline import cache_dir

    requests_of = getattr(config.model_class, "knowledge_requests", None)
    if requests_of is None or not config["batch_file"]:
        raise ValueError(f"--run={run} needs a knowledge-augmented model and --batch_file=<path>")
    requests = [r for rs in requests_of(config, train_data).values() for r in rs]
    if run == "export_batch":
        return {"exported": export_batch(config, cache_dir(config), requests, config["batch_file"],
                                         setting(config, "batch_shards"))}
    return import_batch(config, cache_dir(config), requests, config["batch_file"])


RUNS = ("train", "knowledge", "export_batch", "import_batch")


def run_recbole_llmk(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, run="train",
                     nproc=1, world_size=-1, ip="localhost", port="5678", group_offset=0):
    """Train and evaluate ``model`` (``run='train'``); or only build its knowledge
    (``'knowledge'``); or hand its prompts to a batch service and back (``'export_batch'``,
    ``'import_batch'``, see ``batch_files``). ``nproc`` processes (``world_size`` over all
    machines, rank 0 at ``ip:port``, this machine's first rank ``group_offset``) train one model
    with RecBole's distributed training, on GPUs or CPUs (:mod:`recbole_llmk.distributed`); the
    result is rank 0's, without the model and trainer objects."""
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got '{run}'")
    if nproc == 1 and world_size <= 0:
        return run_one(model, dataset, config_file_list, config_dict, saved, run)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = dict(config_dict or {}, world_size=world_size if world_size > 0 else nproc, ip=ip, port=port,
                       nproc=nproc, offset=group_offset)
    mp.spawn(run_rank, args=(model, dataset, config_file_list, config_dict, saved, run, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def run_rank(rank, model, dataset, config_file_list, config_dict, saved, run, queue):
    """One process of a distributed run (what RecBole's ``run_recboles`` is to ``run_recbole``)."""
    result = run_one(model, dataset, config_file_list, dict(config_dict, local_rank=rank), saved, run)
    if rank == 0:
        queue.put(result)


def run_one(model, dataset, config_file_list, config_dict, saved, run):
    """One process's run. In a distributed run every rank drops its model and trainer (the
    trainer's ``DistributedDataParallel`` holds the process group and gloo's work) and waits for
    the others before the group is destroyed; once, in CI, a rank that destroyed the group under a
    live wrapper without waiting aborted (SIGABRT, "terminate called without an active exception")."""
    config, dataset, train_data, valid_data, test_data = prepare(model, dataset, config_file_list, config_dict)
    try:
        result = run_prepared(config, dataset, train_data, valid_data, test_data, saved, run)
        if is_distributed(config):
            result = {k: v for k, v in result.items() if k not in ("model", "trainer")}  # frees the DDP wrapper
            dist.barrier()
        return result
    finally:
        finish(config)


def run_prepared(config, dataset, train_data, valid_data, test_data, saved, run):
    logger = logging.getLogger()
    if config["encoding_shard"] and run != "knowledge":
        raise ValueError("encoding_shard encodes part of a store's texts and writes no store: use it with "
                         "--run=knowledge, then run without it")
    if run in ("export_batch", "import_batch"):
        result = batch_files(config, train_data, run)
        logger.info(f"{run}: {result} ({config['batch_file']})")
        return result
    start = time.time()
    store = build_knowledge(config, train_data)
    knowledge_seconds = time.time() - start
    if run == "knowledge":
        return {"knowledge_store": store.path if store else None, "knowledge_stores": config["knowledge_stores"],
                "knowledge_seconds": knowledge_seconds}
    model = create_model(config, train_data)
    trainer = get_trainer(config)(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    in_sync = replicas_in_sync(model) if is_distributed(config) else None  # as trained, before the best is loaded
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "knowledge_store": store.path if store else None,
        "knowledge_stores": config["knowledge_stores"],  # every store of the run, by kind (composed models read several)
        "knowledge_seconds": knowledge_seconds,
        "model": model,
        "trainer": trainer,
    }
    if in_sync is not None:
        result.update(replicas_in_sync=in_sync, world_size=config["world_size"])
    write_results(config, result, time.time() - start)
    return result


def write_results(config, result, seconds):
    """A JSON of the run beside its RecBole log (``<log>.json``), for people and scripts to open
    after the run: model, dataset, seed, results, knowledge store, best-model file, times."""
    import json
    import os

    from recbole_llmk import __version__
    from recbole_llmk.files import written_whole

    logs = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    # no log to sit beside when someone else set logging up (a notebook, a test runner); one
    # results file for a distributed run: rank 0's
    if not logs or config["local_rank"] != 0:
        return None
    path = os.path.splitext(logs[0])[0] + ".json"
    summary = {"model": config["model"], "dataset": config["dataset"], "seed": config["seed"],
               "best_valid_result": dict(result["best_valid_result"] or {}),
               "test_result": dict(result["test_result"] or {}),
               "knowledge_store": result["knowledge_store"], "knowledge_stores": result["knowledge_stores"],
               "knowledge_seconds": round(result["knowledge_seconds"], 2),
               "seconds": round(seconds, 2), "best_model_file": getattr(result["trainer"], "saved_model_file", None),
               "log": logs[0], "device": str(config["device"]), "recbole_llmk": __version__,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    with written_whole(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=float)
    logging.getLogger().info(f"results written to {path}")
    return path
