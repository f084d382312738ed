"""Training that survives a kill: RecBole's trainer, resumable with the same numbers.

RecBole saves the best model only, without the random generators' states, so a killed run starts
over (a DIN run on a CPU is hours) and ``resume_checkpoint`` would continue from the best epoch on
other random draws. With ``resume_file`` set, the trainer writes its whole state after every
epoch (after its evaluation, when it has one): weights, optimizer, early-stopping counters, the
best result so far, and the states of torch's, numpy's and Python's generators and of the
training loader's shuffle. A rerun with the same file continues after that epoch and ends with
the weights and results an uninterrupted run would have had (same device and library versions).
"""

import os
import random
import time

import numpy as np
import torch

from recbole_llmk.compat import PlainValueCollectorMixin, SafeCheckpointMixin
from recbole_llmk.distributed import DistributedTrainerMixin
from recbole_llmk.files import written_whole


def random_states(train_data):
    """The state of every generator a training epoch draws from; tensors and plain values only,
    so the file loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
        "loader": train_data.generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states, train_data):
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    train_data.generator.set_state(states["loader"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableMixin:
    """Trainer mixin: with ``resume_file`` set, ``fit`` saves its state after each epoch and
    continues from that file when it exists (a fit without validation saves nothing).
    ``resume_key`` names the run (e.g. its config); a file written under another key is refused
    rather than continued. ``epoch_seconds`` holds the training time of every epoch, those of
    earlier processes included."""

    resume_file = None
    resume_key = ""
    _validates = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_seconds = []
        self.resumed_after = []  # epochs after which an earlier process stopped

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        begin = time.time()
        loss = super()._train_epoch(train_data, epoch_idx, *args, **kwargs)
        self.epoch_seconds.append(time.time() - begin)
        # an evaluated epoch is saved after its evaluation (fit's callback); the others here, or a
        # kill would lose every epoch since the last evaluation (eval_step 10: 25 min of SASRec)
        if self.resume_file and self._validates and (epoch_idx + 1) % self.eval_step:
            self._save_state(epoch_idx, train_data)
        return loss

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._validates = bool(valid_data) and self.eval_step > 0  # as RecBole's fit decides
        if not self.resume_file or not self._validates:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if os.path.isfile(self.resume_file) and self._resume(train_data):
            self.logger.info(f"{self.resume_file}: training had finished, nothing left to run")
            return self.best_valid_score, self.best_valid_result

        def save_state_then(epoch_idx, valid_score):
            self._save_state(epoch_idx, train_data)
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        return super().fit(train_data, valid_data, verbose, saved, show_progress, save_state_then)

    def _finished(self, epoch_idx):
        # RecBole's early_stopping stops once cur_step passes stopping_step
        return epoch_idx + 1 >= self.epochs or self.cur_step > self.stopping_step

    def _save_state(self, epoch_idx, train_data):
        state = {
            "key": self.resume_key,
            "epoch": epoch_idx,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            # RecBole's metrics are numpy floats, which the weights-only loader refuses
            "best_valid_result": {k: float(v) for k, v in (self.best_valid_result or {}).items()},
            "saved_model_file": self.saved_model_file,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "random": random_states(train_data),
            "epoch_seconds": list(self.epoch_seconds),
            "resumed_after": list(self.resumed_after),
        }
        with written_whole(self.resume_file) as tmp:  # a kill mid-write leaves the previous state whole
            torch.save(state, tmp)

    def _resume(self, train_data):
        """Load the saved state; -> True if that run had already finished."""
        state = torch.load(self.resume_file, map_location=self.device, weights_only=True)
        if state["key"] != self.resume_key:
            raise ValueError(f"{self.resume_file} holds the state of another run (its config differs from this "
                             f"one's); delete it to start this run over")
        if state["best_valid_result"] and not os.path.isfile(state["saved_model_file"]):
            raise FileNotFoundError(f"{self.resume_file} continues a run whose best model "
                                    f"{state['saved_model_file']} is gone; delete {self.resume_file} to start over")
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = state["best_valid_result"]
        self.saved_model_file = state["saved_model_file"]
        self.epoch_seconds = state["epoch_seconds"]
        self.resumed_after = state["resumed_after"] + [state["epoch"]]
        set_random_states(state["random"], train_data)
        self.logger.info(f"{self.resume_file}: resuming after epoch {state['epoch']} "
                         f"(best valid score so far {self.best_valid_score:.4f})")
        return self._finished(state["epoch"])


PHASE_STREAMS = {"valid": 1, "test": 2}


def samples_negatives(eval_data):
    """Whether ``eval_data`` draws negatives as it is read (RecBole's uni100/pop100 evaluation)."""
    args = getattr(eval_data, "neg_sample_args", None) or {}
    return args.get("distribution", "none") != "none" and args.get("sample_num", "none") != "none"


class FixedNegativesMixin:
    """Trainer mixin: with ``eval_fixed_negatives``, a sampled evaluation (uni100, pop100) draws
    its negatives from numpy's generator seeded by the run's seed and the phase, and then gives
    training its generator back as it was.

    RecBole's evaluation loader samples each batch's negatives from numpy's global generator as it
    is read, so they depend on every draw before it: the same weights evaluated twice, or a stock
    model and its variant on one seed (other epochs, other knowledge building), are scored against
    different negatives. Fixed, a seed's stock and variant cells see the same test negatives, and
    early stopping compares epochs on the same validation negatives. (The loader samples in the
    main process: RecBole's default ``worker_num`` 0.)"""

    def evaluate(self, eval_data, *args, **kwargs):
        if not (self.config["eval_fixed_negatives"] and samples_negatives(eval_data)):
            return super().evaluate(eval_data, *args, **kwargs)
        phase = getattr(getattr(eval_data, "_sampler", None), "phase", None) or "test"
        training_state = np.random.get_state()
        np.random.seed([self.config["seed"] % 2 ** 32, PHASE_STREAMS.get(phase, 0)])
        try:
            return super().evaluate(eval_data, *args, **kwargs)
        finally:
            np.random.set_state(training_state)


def plugin_trainer_class(trainer_class):
    """The trainer RecBole would pick, with weights-only-safe checkpoints, resumable fits, fixed
    sampled-evaluation negatives and beyond-accuracy metrics that evaluate."""
    from recbole.trainer import Trainer

    if not issubclass(trainer_class, Trainer):
        return trainer_class  # decision-tree trainers keep their own fit and checkpoint format
    return type(trainer_class.__name__, (FixedNegativesMixin, ResumableMixin, DistributedTrainerMixin, SafeCheckpointMixin,
                                         PlainValueCollectorMixin, trainer_class), {})
