"""Every runtime fix that lets RecBole 1.2.1 run on today's Python stack, in one place.

The version pins that go with these fixes are in ``setup.cfg`` (numpy<2, pandas<3, scipy<1.13,
torch>=2.11,<2.14). Nothing here edits RecBole's files; each fix wraps or subclasses.

- ``recbole.quick_start`` imports ray, and ray 2.6.3 imports ``pkg_resources`` (gone from recent
  setuptools). The plugin never imports ``recbole.quick_start``: its own quick start wraps
  RecBole's Config, dataset and trainer directly, so the default path does not import ray.
- torch >= 2.6 loads checkpoints with ``weights_only=True``. RecBole saves the whole Config object
  with ``pickle_protocol=4``, which the weights-only loader refuses. ``SafeCheckpointMixin`` saves
  only tensors and plain values, so RecBole's own ``torch.load`` calls (best-model reload after
  training, ``resume_checkpoint``) work unchanged and nothing is ever loaded with
  ``weights_only=False``.
- RecBole creates ``./log/<model>`` and ``checkpoint_dir`` by "create if missing", so the second
  of two runs started at once in one folder dies with ``FileExistsError``. ``make_run_folders``
  creates them first, idempotently.
- Importing ``recbole.model.sequential_recommender`` (which RecBole's ``get_model`` does for DIN,
  DIEN, every sequential model and every model listed after them) runs ``sine.py``'s
  module-level ``torch.autograd.set_detect_anomaly(True)``: anomaly detection, a debugging mode,
  for the whole process. It changes no number but costs time: 38 % of a DIN training step on
  ml-100k went to its NaN checks. ``set_process_modes`` puts it back to the ``detect_anomaly``
  setting (default off) once RecBole's models are imported.
- Not a RecBole bug, but it decides CPU timings: Adam's moment estimates for ids a batch does not
  show decay step by step into denormal floats, which x86 CPUs compute on slowly, so long CPU runs
  slow down epoch after epoch (xDeepFM_REKI on ml-1m-u2999: 0.59 s per step at epoch 6, 1.43 s
  500 steps later). ``flush_denormal: True`` flushes them to zero (0.59 s again); off by default
  because it may change results in the last digits against RecBole's own.
- Not a RecBole bug either: glibc serves every allocation above 32 MiB (DIN's attention MLP and
  SASRec's layers make several per step) with fresh pages from the kernel and returns them on
  free, so each step pays page faults to zero the same memory again; a third of a DIN training
  step's CPU time on ml-100k was kernel time. ``keep_freed_memory: True`` (the default) has the
  process reuse the memory it freed (``keep_freed_memory()``): DIN steps 1.4x, SASRec 1.45x
  faster on one core, and no number changes, since only where tensors live changes.
- RecBole's beyond-accuracy metrics (AveragePopularity, ItemCoverage, GiniIndex, ShannonEntropy,
  TailPercentage) read the training split's item counts (a ``Counter``) and its numbers of items
  and users (``int``), and its evaluation collector calls ``.cpu()`` on every value it collected,
  so the first evaluation with one of them dies with ``AttributeError`` (RecBole issues 2191,
  2194). ``PlainValueCollectorMixin`` moves the tensors only; the metrics compute as RecBole
  writes them.
"""

import copy
import ctypes
import os
import warnings

import numpy as np
import torch


def check_stack():
    """Fail early, naming the fix, when the installed stack is one RecBole 1.2.1 cannot run on."""
    if int(np.__version__.split(".")[0]) >= 2:
        raise ImportError(
            f"numpy {np.__version__} is installed, but RecBole 1.2.1 needs numpy<2 "
            "(its Config uses np.float_). Reinstall as the README says: pip install -e ."
        )
    # pandas 2.x warns about chained fillna(inplace=True) inside RecBole's dataset code; the
    # pin pandas<3 keeps that code working, so the warning is noise for RecBole users.
    warnings.filterwarnings("ignore", category=FutureWarning, module="recbole")
    warnings.filterwarnings("ignore", message=".*ChainedAssignment.*")


def make_run_folders(config):
    """Create the folders RecBole's logger and trainer write to, tolerating another run doing the
    same at the same moment (parallel benchmark cells, a hyper-parameter search in one folder)."""
    os.makedirs(os.path.join("log", config["model"]), exist_ok=True)  # init_logger's LOGROOT is ./log/
    os.makedirs(config["checkpoint_dir"], exist_ok=True)


def set_process_modes(config):
    """Process-wide modes as the config says: autograd anomaly detection (``detect_anomaly``),
    whatever importing RecBole's models did; denormal floats flushed to zero (``flush_denormal``);
    freed memory kept for reuse (``keep_freed_memory``; once on, it stays on for the process)."""
    import recbole.model.sequential_recommender  # noqa: F401  (its sine.py turns detection on when imported)

    torch.autograd.set_detect_anomaly(bool(config["detect_anomaly"]))
    torch.set_flush_denormal(bool(config["flush_denormal"]))
    if config["keep_freed_memory"]:
        keep_freed_memory()


def keep_freed_memory():
    """Have glibc's malloc serve large blocks from the heap it keeps, not from fresh kernel pages
    that it returns on free; True if the C library took the settings (glibc), False elsewhere."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols to look in, or not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    # mallopt takes an int: keep up to 2 GiB of freed heap top rather than trimming it.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def plain_value(value):
    """Keep what torch's weights-only unpickler accepts: tensors, numbers, strings, containers."""
    if isinstance(value, (torch.Tensor, int, float, str, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(plain_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and plain_value(v) for k, v in value.items())
    return False


class SafeCheckpointMixin:
    """Trainer mixin: checkpoints that reload with ``torch.load(weights_only=True)``.

    RecBole's checkpoint carries the Config object (only its model name is read back, by
    ``resume_checkpoint``) and ``other_parameter``, which for DIN/DIEN holds a module that the
    state dict already contains. Both are reduced to plain values here.
    """

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        other = {k: v for k, v in self.model.other_parameter().items() if plain_value(v)}
        state = {
            "config": {"model": self.config["model"], "dataset": self.config["dataset"]},
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "state_dict": self.model.state_dict(),
            "other_parameter": other,
            "optimizer": self.optimizer.state_dict(),
        }
        torch.save(state, saved_model_file)
        if verbose:
            self.logger.info(f"Saving current: {saved_model_file}")


def plain_value_collector(config):
    """RecBole's evaluation collector, keeping the plain values it collects (the module's notes)."""
    from recbole.evaluator import Collector  # here, not at the top: this module runs before RecBole may be imported

    class PlainValueCollector(Collector):
        def get_data_struct(self):
            values = self.data_struct._data_dict
            plain = {key: value for key, value in values.items() if not isinstance(value, torch.Tensor)}
            for key in plain:
                del values[key]
            try:
                struct = super().get_data_struct()  # moves the tensors, copies, drops the batch's results
            finally:
                values.update(plain)
            struct._data_dict.update(copy.deepcopy(plain))
            return struct

    return PlainValueCollector(config)


class PlainValueCollectorMixin:
    """Trainer mixin: evaluation that takes RecBole's beyond-accuracy metrics (the module's notes)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = plain_value_collector(config)
