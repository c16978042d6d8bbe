"""bench/vs_trl.py's summary of one point: medians after the warm-up step, the weight-sync check."""

import math

from bench.vs_trl import markdown, summarize


class _Callback:
    steps = [2.0, 0.40, 0.50, 0.45]  # TRL: the first is the warm-up
    tokens = [700.0, 710.0, 720.0, 730.0]


def _prime(step: float, gap: float | None = None) -> dict[str, float]:
    m = {"timing/step": step, "timing/overhead": 0.1 * step, "timing/overhead_frac": 0.1,
         "rollout/generated_tokens": 760.0, "timing/generate": 0.5 * step}
    return m if gap is None else m | {"rollout/logprob_gap": gap}


def test_summary_takes_medians_after_the_first_step_and_the_largest_logprob_gap():
    steps = [_prime(3.0, 2e-7), _prime(0.5), _prime(0.6), _prime(0.4, 5e-7)]
    row = summarize("tiny", _Callback(), steps, [1.0, 1.0, 1.0])
    assert row["trl_step"] == 0.45 and row["prime_step"] == 0.5  # medians of [0.4, 0.5, 0.45] and [0.5, 0.6, 0.4]
    assert math.isclose(row["ratio"], 0.5 / 0.45)
    assert row["generate"] == 0.25 and row["trl_tokens"] == 720.0
    assert row["logprob_gap"] == 5e-7 and row["logprob_gap_steps"] == 2
    line = markdown([row | {"variant": "default"}]).splitlines()[-1]
    assert "| 1.11x |" in line and "| 5.0e-07 (2) |" in line


def test_a_run_without_checked_steps_says_so():
    row = summarize("tiny", _Callback(), [_prime(1.0), _prime(0.5)], [0.0, 0.0, 0.0])
    assert math.isnan(row["logprob_gap"]) and row["logprob_gap_steps"] == 0
    assert "| nan (0) |" in markdown([row | {"variant": "default"}])


def test_the_update_is_compared_with_its_limit_at_the_median_step_tokens():
    def step(update: float, tokens: float) -> dict[str, float]:
        # the update ran 80% of the batch's tokens (its prompts packed once)
        return _prime(0.5) | {"compute/update_policy": update, "batch/tokens": tokens, "policy/tokens": 0.8 * tokens}

    row = summarize("small", _Callback(), [step(9.0, 100.0), step(6.0, 9000.0), step(6.5, 9200.0), step(7.0, 9100.0)],
                    [0.0, 0.0, 0.0])
    assert row["update_compute"] == 6.5 and row["batch_tokens"] == 9100.0  # medians after the first step
    assert row["update_tokens"] == 7280.0
    row |= {"update_limit": 5.0, "update_vs_limit": 6.5 / 5.0, "update_vs_run_limit": 6.5 / 4.0, "variant": "default"}
    assert "| 5.00 (9100) | 1.30x | 7280 (1.62x) |" in markdown([row])
    # skipped (--limit-repeats 0): the columns say nan
    skipped = {k: v for k, v in row.items() if k not in ("update_limit", "update_vs_limit", "update_vs_run_limit")}
    assert "| nan (9100) | nanx | 7280 (nanx) |" in markdown([skipped])
    # a run without the metric (an older trainer): the update ran the batch's tokens
    old = summarize("small", _Callback(), [{k: v for k, v in s.items() if k != "policy/tokens"}
                                           for s in (step(9.0, 100.0), step(6.0, 9000.0))], [0.0, 0.0, 0.0])
    assert old["update_tokens"] == old["batch_tokens"] == 9000.0
