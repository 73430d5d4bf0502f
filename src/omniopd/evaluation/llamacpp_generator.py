"""Evaluation through llama.cpp (``eval.engine=llamacpp``, ``omniopd eval --engine llamacpp``).

The model's weights are written as a float32 GGUF file with the metadata of the GGUF file the student came from
(:mod:`omniopd.engine.gguf_export`), and :class:`omniopd.teachers.llamacpp.LlamaCppEngine` decodes every problem's
answer: up to ``n_parallel`` sequences at once, each with its own cache cells (independent prompts), and a
finished sequence's slot taken at once by the next problem, its prompt prefilled beside the others' next tokens
(continuous batching). Greedy is the argmax of the same logits; sampling (temperature > 0) draws
from the raw distribution, one random stream per problem and sample. The prompt is the student's chat template,
tokenized by the model's own Hugging Face tokenizer, as :class:`omniopd.evaluation.runner.HFGenerator` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from omniopd.engine.prompts import student_messages
from omniopd.engine.rollout import chat_prompts
from omniopd.evaluation.sample import Sample


class LlamaCppGenerator:
    def __init__(self, gguf: Path, tokenizer, name: str = "model", *, n_parallel: int = 64, seed: int = 0):
        self.gguf, self.tokenizer, self.name = gguf, tokenizer, name
        self.n_parallel, self.seed = n_parallel, seed

    @classmethod
    def from_model(
        cls, model, tokenizer, template_gguf: Path, name: str = "model", dtype: str = "f32", **kwargs
    ) -> LlamaCppGenerator:
        from omniopd.engine.gguf_export import gguf_for

        return cls(gguf_for(model, template_gguf, dtype), tokenizer, name, **kwargs)

    def generate(self, problems, *, n, max_new_tokens, temperature, batch_size, desc, show_progress):
        from omniopd.teachers.llamacpp import LlamaCppEngine, _Unit

        tok = self.tokenizer
        prompts = chat_prompts(tok, [student_messages(p.question, p.instruction) for p in problems])
        ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        per_seq = -(-(max(len(x) for x in ids) + max_new_tokens + 1) // 256) * 256  # llama.cpp pads to 256 cells
        parallel = min(self.n_parallel, len(problems) * n)
        n_batch = max(2048, max(len(x) for x in ids) + parallel)
        engine = LlamaCppEngine(
            self.gguf, n_ctx=parallel * per_seq, n_parallel=parallel, n_batch=n_batch, unified=False
        )
        units = [
            _Unit(i, ids[i], range(n), [np.random.default_rng([self.seed, i, j]) for j in range(n)])
            for i in range(len(problems))
        ]
        try:
            with tqdm(total=len(problems), desc=desc, unit="problem", disable=not show_progress, leave=False) as bar:
                answers = engine.generate_continuous(
                    units,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=1.0,
                    on_unit_done=lambda _: bar.update(1),
                )
        finally:
            engine.close()
        out: list[list[Sample]] = []
        for samples in answers:
            row = []
            for t in samples:
                finished = len(t) < max_new_tokens  # a shorter answer ended on an end-of-generation token
                row.append(Sample(tok.decode(t, skip_special_tokens=True), len(t) + int(finished), finished))
            out.append(row)
        return out
