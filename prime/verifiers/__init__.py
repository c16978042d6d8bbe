"""Outcome verifiers: text in, score out.

- :mod:`prime.verifiers.math`: ``score(response, ground_truth)`` through math-verify (1.0 / 0.0);
- :mod:`prime.verifiers.code`: ``score(response, tests, timeout_s)``, fraction of test cases passed
  by the response's last Python block, run in :mod:`prime.verifiers.sandbox`;
- :mod:`prime.verifiers.registry`: ``grade(row_or_kind, response, ground_truth)`` picks the grader;
- :mod:`prime.verifiers.pool`: ``VerifierPool`` grades batches in worker processes with hard
  per-item timeouts (wrapped as the Ray role ``workers.verifier.VerifierWorker``).

Importing this package imports nothing heavy; sympy / math-verify load on first math grading.
"""
