"""omniopd: logit-free on-policy distillation.

The student samples its own answers, a peak-entropy scheduler picks the most uncertain chunks, a
text-only teacher writes N continuations of the prefix before each chunk, and their similarity to the
student's chunk becomes a Dirichlet-Multinomial-smoothed weight on that chunk's log-likelihood, while
an exact KL anchor holds every other token to the base model. See ``docs`` and the README.
"""

__version__ = "0.1.0"
