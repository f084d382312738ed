"""One cell run in this process: train, evaluate, time, and record which code, libraries and device made it."""

import json
import os
import platform
import subprocess
import time

from harness import ROOT
from harness.schema import file_label, is_stock
from harness.users import evaluated_per_user


def run_cell(model, dataset, config, label=None, resume_file=None, progress=None, on_validation=None):
    """Train, evaluate and time one cell in this process; -> a JSON-able dict. With
    ``resume_file``, training saves its state there after each epoch and a rerun of a
    killed cell continues from it (to the same numbers; see recbole_llmk.trainer).
    ``progress(**event)`` hears where the cell is: ``knowledge_seconds`` once its knowledge is
    built (a stock model has none), then ``epoch`` (epochs done) and ``epochs`` as each training epoch starts.
    ``on_validation(trainer, test_data, epoch, valid_score)`` runs after each validation (RecBole's
    ``fit`` callback), e.g. to score the test split along the way (``valid_test_curves.py``).
    A full-sort cell also holds ``per_user_test``, each test user's top-k metrics (``harness.users``)."""
    import resource

    import torch
    from recbole.utils import get_local_time

    from recbole_llmk.quick_start import build_knowledge, create_model, prepare
    from recbole_llmk.utils import get_trainer

    key = json.dumps({"model": model, "dataset": dataset, "config": config}, sort_keys=True, default=str)
    began, code = time.time(), code_version()  # the code as this process loaded it, not as it is at the end
    config, _, train_data, valid_data, test_data = prepare(model, dataset, config_dict=config)
    start = time.time()
    store = build_knowledge(config, train_data)
    knowledge_seconds = time.time() - start
    progress = progress or (lambda **event: None)
    if store is not None:
        progress(knowledge_seconds=knowledge_seconds)
    net = create_model(config, train_data)
    trainer = reporting_epochs(get_trainer(config), progress)(config, net)
    trainer.resume_file, trainer.resume_key = resume_file, key
    # RecBole names the best model by model and second: two cells of one model started in the same
    # second (a GPU machine starting 8 at once) would then test each other's model. The label and
    # process id make the name one cell's own.
    name = f"{file_label(label or model)}-{config['seed']}-{get_local_time()}-{os.getpid()}.pth"
    trainer.saved_model_file = os.path.join(config["checkpoint_dir"], name)
    callback = on_validation and (lambda epoch, score: on_validation(trainer, test_data, epoch, score))
    best_valid, valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=callback)
    test_result, users = evaluated_per_user(trainer, test_data, load_best_model=True)
    epoch_seconds = trainer.epoch_seconds  # those of killed earlier runs of this cell included
    cell = {
        "model": label or model, "recbole_model": model, "dataset": dataset, "seed": config["seed"],
        "test": dict(test_result), "valid": dict(valid_result),
        "epochs_run": len(epoch_seconds),
        "train_epoch_seconds": sum(epoch_seconds) / max(len(epoch_seconds), 1),
        "train_batch_ms": 1000 * sum(epoch_seconds) / max(len(epoch_seconds) * len(train_data), 1),
        "knowledge_seconds": knowledge_seconds,
        "knowledge": knowledge_report(config, store),
        "infer_batch_ms": inference_ms(net, test_data),
    }
    if hasattr(net, "prestore_knowledge"):
        net.prestore_knowledge(drop_adapter=True)
        cell["infer_batch_ms_prestored"] = inference_ms(net, test_data)
        cell["test_prestored"] = dict(trainer.evaluate(test_data, load_best_model=False))
    cell["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # how busy the machine was: times of cells that shared the CPU with other work are not clean
    cell["load_average_1min"] = os.getloadavg()[0]
    cell["device"] = str(config["device"])
    if torch.cuda.is_available():
        cell["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if trainer.resumed_after:
        cell["resumed_after_epochs"] = trainer.resumed_after
    cell["provenance"] = dict(code, **provenance(config, store, time.time() - began))
    if users:  # the runner writes them beside the cell (users/), not in it: tens of thousands of rows
        cell["per_user_test"] = users
    if resume_file and os.path.isfile(resume_file):
        os.remove(resume_file)  # first: a state must never outlive the best model it names
    os.remove(trainer.saved_model_file)
    return cell


def reporting_epochs(trainer_class, progress):
    """``trainer_class`` telling ``progress`` each epoch it starts (after a resume, the first is
    the epoch after the saved one), so a runner can show where a cell is and when it will end."""

    class Reporting(trainer_class):
        def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
            progress(epoch=epoch_idx, epochs=self.epochs)
            return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)

    return Reporting


def knowledge_report(config, store):
    """What generating the run's knowledge cost (the store's generation report): for a model that
    composes techniques, the counts of every store it read, summed."""
    from recbole_llmk.knowledge.store import KnowledgeStore

    paths = list((config["knowledge_stores"] or {}).values())
    reports = [r for r in (KnowledgeStore.open(p).meta.get("generation") for p in paths) if r]
    if len(reports) < 2:
        return store.meta.get("generation") if store else None
    summed = {k: sum(r.get(k) or 0 for r in reports) for k, v in reports[0].items() if isinstance(v, (int, float))}
    return dict(summed, backend="+".join(str(r.get("backend")) for r in reports))


CODE_PATHS = ("recbole_llmk", "benchmarks/run_suite.py", "benchmarks/harness", "setup.cfg")


def code_version():
    """The repository's commit and whether the plugin's code differs from it (uncommitted edits)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "code_changed": bool(git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS))}


def cpu_name():
    """The CPU's model name, as the kernel reports it (``platform.processor()`` where it does not)."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())


def provenance(config, store, seconds):
    """Which libraries, threads and device produced a cell (with :func:`code_version`, which
    code): versions, torch's threads, the device's name, the knowledge store (its folder names its
    settings' digest) and the cell's wall time."""
    import numpy
    import recbole
    import torch
    import transformers

    stores = config["knowledge_stores"] or {}
    device = str(config["device"])
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = cpu_name()
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__, "recbole": recbole.__version__,
                         "transformers": transformers.__version__, "numpy": numpy.__version__},
            "threads": torch.get_num_threads(), "device": device, "device_name": name,
            "store": os.path.basename(store.path) if store else None,
            "store_created": store.meta.get("created") if store else None,
            **({"stores": {kind: os.path.basename(path) for kind, path in stores.items()}} if len(stores) > 1 else {}),
            "wall_seconds": round(seconds, 1)}


def build_cell_store(model, dataset, config):
    """The knowledge store one cell needs, built or found, with nothing trained; -> a JSON-able dict."""
    from recbole_llmk.quick_start import build_knowledge, prepare

    if is_stock(model):  # no dataset to load for nothing
        return {"model": model, "seed": config["seed"], "store": None, "seconds": 0.0}
    config, _, train_data, _, _ = prepare(model, dataset, config_dict=config)
    start = time.time()
    store = build_knowledge(config, train_data)
    return {"model": model, "seed": config["seed"], "store": store.path if store else None,
            "seconds": time.time() - start}


def inference_ms(model, data, repeats=3):
    """Mean milliseconds per evaluation batch (best of ``repeats`` passes) of what RecBole's
    evaluator calls: ``full_sort_predict`` for full-sort loaders, else ``predict``."""
    import torch
    from recbole.data.dataloader import FullSortEvalDataLoader

    model.eval()
    score = model.full_sort_predict if isinstance(data, FullSortEvalDataLoader) else model.predict
    batches = [batch[0].to(model.device) for batch in data]
    best = float("inf")
    with torch.no_grad():
        score(batches[0])  # warm-up
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            begin = time.perf_counter()
            for batch in batches:
                score(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - begin) / len(batches))
    return 1000 * best
