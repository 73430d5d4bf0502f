"""Teachers: text-continuation oracles behind one tiny interface (see ``base``), one module per backend."""

from omniopd.teachers.base import ContinuationRequest, ContinuationResult, SamplingSpec, Teacher
from omniopd.teachers.factory import build_teacher

__all__ = ["ContinuationRequest", "ContinuationResult", "SamplingSpec", "Teacher", "build_teacher"]
