"""The ``hf`` backend: a local transformers causal LM (a folder or a GGUF file), batched, cached.
"""

import logging
import os

from tqdm import tqdm

from recbole_llmk.knowledge.answer_quality import assess
from recbole_llmk.knowledge.generation import GenerationError, _CachedBackend
from recbole_llmk.knowledge.local_llm import load_causal_lm, model_identity

class HFBackend(_CachedBackend):
    """A local transformers causal LM, generating in batches (left-padded, new tokens only).

    ``llm_model``: a transformers folder or a GGUF file (local_llm.py). An answer stops at the
    model's end of turn (its generation config's eos tokens); one that reaches llm_max_tokens
    first is recorded with finish_reason "length". The model loads on the first prompt that is
    not cached, so a fully cached run never pays for loading it."""

    name = "hf"

    def __init__(self, settings, cache):
        super().__init__(settings, cache)
        settings.require_model("a local transformers causal-LM folder or a GGUF file")
        self._model = None
        self._tokenizer = None
        try:
            self._model_id = model_identity(settings.model)
        except (OSError, ValueError) as exc:
            raise GenerationError(f"llm_model={settings.model!r} (llm_backend=hf): {exc}") from exc

    @property
    def model_id(self):
        return self._model_id

    def _load(self):
        if self._model is not None:
            return
        import torch

        path = self.settings.model
        try:
            tokenizer, model = load_causal_lm(path)
        except (OSError, ValueError, ImportError) as exc:
            raise GenerationError(f"llm_model={path!r} could not be loaded as a transformers causal LM "
                                  f"(llm_backend=hf): {exc}") from exc
        tokenizer.padding_side = "left"  # generation continues right after the prompt
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._device = torch.device(self.settings.device or "cpu")
        self._tokenizer, self._model = tokenizer, model.to(self._device).eval()
        eos = model.generation_config.eos_token_id
        self._end_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])} - {None}

    def _render(self, messages):
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def _run(self, jobs, tally):
        self._load()
        jobs = sorted(jobs, key=lambda job: len(job.prompt))  # similar lengths: less padding
        size, empty = self.settings.batch_size, 0
        with tqdm(total=len(jobs), desc=f"LLM {os.path.basename(self.model_id)}", unit="prompt") as bar:
            for begin in range(0, len(jobs), size):
                with self.cache.claim(*(job.hash for job in jobs[begin:begin + size])):
                    batch = [job for job in jobs[begin:begin + size] if not self._answered_elsewhere(job, tally)]
                    for job, (answer, usage, finish_reason) in zip(batch, self._generate_batch(batch) if batch else []):
                        # Cached even when empty: the answer gate decides whether to ask again.
                        self.cache.put(job.hash, job.keys[0], self.model_id, job.prompt, answer, usage,
                                       finish_reason=finish_reason, **job.record_fields(assess(answer, job.prompt)))
                        tally.add(called=1, **usage)
                        empty += not answer
                bar.update(min(size, len(jobs) - begin))
        if empty:
            logging.getLogger().warning(f"{empty} of {len(jobs)} answers of {self.model_id} are empty; check that "
                                        f"it is an instruction-tuned model and that llm_max_tokens is large enough")
        return {}

    def _generate_batch(self, batch):
        import torch

        tokenizer = self._tokenizer
        templated = bool(getattr(tokenizer, "chat_template", None))
        texts = [self._render(job.messages) for job in batch]
        # A chat template already holds the special tokens; adding them again would double BOS.
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
        encoded = {name: tensor.to(self._device) for name, tensor in encoded.items()}
        temperature = self._temperature(batch[0])  # one round's jobs share it
        options = {"max_new_tokens": self.settings.max_tokens, "pad_token_id": tokenizer.pad_token_id,
                   "do_sample": temperature > 0}
        if options["do_sample"]:
            options["temperature"] = temperature
        if self.settings.repetition_penalty is not None:
            options["repetition_penalty"] = self.settings.repetition_penalty
        with torch.no_grad():
            output = self._model.generate(**encoded, **options)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompt_counts = encoded["attention_mask"].sum(dim=1).tolist()
        ended = torch.isin(new_tokens, torch.tensor(sorted(self._end_ids), device=new_tokens.device))
        # Tokens up to and including the end of turn (pad may equal eos, so count by position).
        first_end = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, new_tokens.shape[1])
        return [(answer.strip(), {"prompt_tokens": int(p), "completion_tokens": int(c)}, "stop" if done else "length")
                for answer, p, c, done in zip(answers, prompt_counts, first_end.tolist(), ended.any(dim=1).tolist())]
