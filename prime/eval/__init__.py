"""Evaluation: pass@k, maj@k and implicit-PRM reranking of sampled responses.

- `prime.eval.metrics`: the metric definitions, as pure functions over lists and tensors;
- `prime.eval.prm`: `ImplicitPRMScorer`, per-token log-ratios of a PRM against its reference;
- `prime.eval.runner`: `evaluate(problems, engine, grade, settings, prm)` and the record types;
- `prime.eval.suite`: benchmark suites (YAML) such as `configs/eval/prime_paper.yaml`.

The `prime eval` command (`launch/eval.py`) wires these to an engine and a `VerifierPool`.
"""
