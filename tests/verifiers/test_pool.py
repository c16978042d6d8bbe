"""VerifierPool: real math/code grading, hung graders killed and replaced, failures counted."""

import time

import pytest

from prime.verifiers.pool import MAX_CHUNK, VerifierPool, chunk_size

from ._pool_graders import misbehaving_grader

ADD_TESTS = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
ADD_OK = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def _items(*responses):
    return [{"kind": "math", "response": r, "ground_truth": "1"} for r in responses]


def test_real_math_and_code_batch():
    items = [
        {"ability": "math", "response": r"\boxed{\frac12}", "ground_truth": "0.5"},
        {"ability": "math", "response": r"\boxed{3}", "ground_truth": "4"},
        {"data_source": "taco", "response": ADD_OK, "ground_truth": ADD_TESTS},
        # verl row layout: the ground truth sits under reward_model.
        {"ability": "code", "response": "```python\nprint(3)\n```", "reward_model": {"ground_truth": ADD_TESTS}},
        # malformed tests: a grader error, counted, scored 0
        {"ability": "code", "response": ADD_OK, "ground_truth": "not json"},
    ]
    with VerifierPool(num_workers=2, timeout_s=20, code_case_timeout_s=4) as pool:
        scores, metrics = pool.score(items)
    assert scores == [1.0, 0.0, 1.0, 0.5, 0.0]
    assert metrics["verify/items"] == 5
    assert metrics["verify/errors"] == 1
    assert metrics["verify/timeouts"] == 0
    assert metrics["verify/mean_score"] == pytest.approx(2.5 / 5)
    assert metrics["verify/seconds"] > 0


def test_hanging_grader_is_killed_and_does_not_block():
    with VerifierPool(num_workers=2, timeout_s=1.0, code_case_timeout_s=1.0, grade_fn=misbehaving_grader) as pool:
        start = time.monotonic()
        scores, metrics = pool.score(_items("hang", "1", "hang", "0.5", "1", "1"))
        wall = time.monotonic() - start
        # Two hangs on two workers: each is killed at 1 s and replaced; the rest still run.
        assert scores == [0.0, 1.0, 0.0, 0.5, 1.0, 1.0]
        assert metrics["verify/timeouts"] == 2
        assert metrics["verify/errors"] == 0
        assert wall < 4.0
        assert pool.replaced_workers == 2
        # The replacement workers keep serving.
        scores, metrics = pool.score(_items("1", "0"))
        assert scores == [1.0, 0.0] and metrics["verify/timeouts"] == 0


def test_grader_errors_and_dead_workers_are_counted():
    with VerifierPool(num_workers=2, timeout_s=5.0, code_case_timeout_s=4.0, grade_fn=misbehaving_grader) as pool:
        scores, metrics = pool.score(_items("raise", "die", "timeout", "1"))
    assert scores == [0.0, 0.0, 0.0, 1.0]
    assert metrics["verify/errors"] == 2  # the exception and the dead worker
    assert metrics["verify/timeouts"] == 1  # reported by the grader itself
    assert metrics["verify/mean_score"] == 0.25


def test_items_queued_behind_a_hang_or_a_death_are_graded():
    # One worker gets the whole batch in chunks; the items behind the one that hangs (or kills the
    # worker) go to its replacement, and each item keeps its own time limit.
    with VerifierPool(num_workers=1, timeout_s=1.0, code_case_timeout_s=1.0, grade_fn=misbehaving_grader) as pool:
        scores, metrics = pool.score(_items("hang", "1", "0.5", "die", "1", "0"))
        assert scores == [0.0, 1.0, 0.5, 0.0, 1.0, 0.0]
        assert metrics["verify/timeouts"] == 1 and metrics["verify/errors"] == 1
        assert pool.replaced_workers == 2


def test_chunk_size_shrinks_with_what_is_left():
    assert [chunk_size(n, 2) for n in (32, 24, 18, 13, 9, 6, 4, 3, 2, 1)] == [8, 6, 5, 4, 3, 2, 1, 1, 1, 1]
    assert chunk_size(10_000, 2) == MAX_CHUNK
    assert chunk_size(5, 8) == 1


def test_empty_batch_and_bad_items():
    with VerifierPool(num_workers=1, timeout_s=5.0, code_case_timeout_s=4.0, grade_fn=misbehaving_grader) as pool:
        assert pool.score([]) == ([], {
            "verify/items": 0.0, "verify/mean_score": 0.0, "verify/timeouts": 0.0,
            "verify/errors": 0.0, "verify/seconds": pytest.approx(0.0, abs=0.1),
        })
        with pytest.raises(ValueError, match="item 1: unknown task type"):
            pool.score([_items("1")[0], {"kind": "poetry", "response": "x", "ground_truth": "y"}])
        with pytest.raises(ValueError, match="item 0 must be a dict"):
            pool.score(["just a string"])
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool(num_workers=0, timeout_s=5.0, code_case_timeout_s=4.0)


@pytest.mark.slow
def test_verifier_worker_as_ray_actor():
    ray = pytest.importorskip("ray")
    import os

    from workers.verifier import VerifierWorker

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from workers.group import init_ray

    init_ray("local", num_cpus=2, env_vars={"PYTHONPATH": repo})  # bound to 127.0.0.1
    try:
        actor = ray.remote(num_cpus=1)(VerifierWorker).remote(num_workers=1, timeout_s=20, code_case_timeout_s=4)
        items = [
            {"ability": "math", "response": r"\boxed{2\sqrt{2}}", "ground_truth": r"\sqrt{8}"},
            {"ability": "code", "response": ADD_OK, "ground_truth": ADD_TESTS},
            {"ability": "math", "response": "no answer", "ground_truth": "5"},
        ]
        scores, metrics = ray.get(actor.score.remote(items), timeout=120)
        assert scores == [1.0, 1.0, 0.0]
        assert metrics["verify/items"] == 3
        ray.get(actor.shutdown.remote())
    finally:
        ray.shutdown()


def test_forkserver_warms_math_grading_before_forking():
    """The forkserver imports prime.verifiers.warm last, after math-verify, and its items grade as
    a malformed box, a wrong symbolic answer, and two right ones."""
    from prime.verifiers import pool
    from prime.verifiers.math import score
    from prime.verifiers.warm import WARM_ITEMS

    assert pool._PRELOAD[-1] == "prime.verifiers.warm" and pool._PRELOAD[0] == "math_verify"
    assert [score(r, t) for r, t in WARM_ITEMS] == [0.0, 0.0, 1.0, 1.0]
