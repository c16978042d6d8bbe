"""The same job over lanes (`cluster.step_lanes`, the default) and over Ray's calls must log the same
step: lanes change how the step's calls travel, never what they compute.

PRIME with the online PRM on the HF engine, two engines and one verifier actor (chained grading),
the accuracy filter (up to 2 generation rounds a step), the separate old-log-prob pass, and a
held-out evaluation every 2 steps (Ray calls in the middle of the run, so the lanes close and open
again).
"""

import pytest
import torch

from tests.launch.test_e2e import eval_file, load_state, make_cfg, read_metrics
from tests.launch.test_faults import comparable

pytestmark = pytest.mark.slow

ARGS = ("rollout.engine=hf", "rollout.num_engines=2", "verifier.num_actors=1", "trainer.total_steps=3",
        "actor.old_logprob_pass=always", "trainer.eval_every=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from launch.train import run

    tmp = tmp_path_factory.mktemp("lanes")
    held_out = eval_file(tmp)
    return {lanes: run(make_cfg(tmp, *ARGS, f"data.eval_files=[{held_out}]", f"cluster.step_lanes={lanes}",
                                f"trainer.run_name=lanes_{lanes}"))
            for lanes in ("true", "false")}


def test_lanes_and_ray_calls_log_the_same_steps_and_weights(runs):
    over_lanes, over_ray = (read_metrics(runs[k]) for k in ("true", "false"))
    assert [r["step"] for r in over_lanes] == [0, 1, 2, 3]
    assert comparable(over_lanes) == comparable(over_ray)
    a, b = (load_state(f"{runs[k]}/final_policy") for k in ("true", "false"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
