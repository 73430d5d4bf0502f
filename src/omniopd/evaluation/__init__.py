"""Evaluation of model outputs: math answers and model-written code.

* :mod:`omniopd.evaluation.mathgrade` extracts and compares final answers of math problems;
  :mod:`omniopd.evaluation.runner` generates with a student and grades it on a math benchmark.
* :mod:`omniopd.evaluation.sandbox` runs untrusted Python in a separate, resource-limited process.
* :mod:`omniopd.evaluation.code` grades HumanEval and MBPP+ completions in that sandbox and computes
  pass@k. It takes completions as strings; generation happens elsewhere.
"""
