"""The training methods, as equals: the paper's OmniOPD and the baselines SFT, white-box OPD and GRPO
(ALGORITHM.md "Baselines"), each a :class:`~omniopd.methods.base.Method` in :data:`METHODS`.

Every method runs through the trainer's one loop, ``sample -> audit -> per micro-batch: loss_inputs -> loss
-> backward -> step -> accumulate -> log``, with the same prompt stream, optimizer, normaliser, logging and
evaluation; a method is one file (``omniopd.py``, ``sft.py``, ``opd.py``, ``grpo.py``; what they share is in
``base.py``) that turns a micro-batch into per-token signals (``core.losses.LossInputs``) and names a loss
registered in ``core.losses`` (pure functions, tested against exact values).

Metric keys are shared where they apply: ``loss/total`` for all, ``rollout/*`` for on-policy methods
only (SFT logs ``sft/*`` about its targets instead), ``teacher/tokens`` and ``teacher/requests`` for the
teacher's work (SFT: the tokens of the solutions used, counted even when read from the cache; OPD: the
tokens of the teacher's forward passes), ``audit/*`` only for OmniOPD.
"""

from __future__ import annotations

from omniopd.methods.base import Method, NoTeacher, StepSignal, TeacherRole, TrainState, micro_batches, sample_on_policy
from omniopd.methods.grpo import GRPO, correctness_reward
from omniopd.methods.omniopd import OMNIOPD
from omniopd.methods.opd import OPD, check_white_box_teacher, teacher_scoring_batch, teacher_tokenizer_differs
from omniopd.methods.sft import SFT, SFTTarget, sft_cache_path, teacher_solutions, visited_examples

METHODS: dict[str, Method] = {m.name: m for m in (OMNIOPD, SFT, OPD, GRPO)}

__all__ = [
    "METHODS",
    "Method",
    "NoTeacher",
    "SFTTarget",
    "StepSignal",
    "TeacherRole",
    "TrainState",
    "check_white_box_teacher",
    "correctness_reward",
    "micro_batches",
    "sample_on_policy",
    "sft_cache_path",
    "teacher_scoring_batch",
    "teacher_solutions",
    "teacher_tokenizer_differs",
    "visited_examples",
]
