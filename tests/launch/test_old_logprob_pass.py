"""Step plan choices: when a step skips the separate old-log-prob pass (`launch.train.on_policy_update`),
when it checks the engines' log-probs, and when the weight sync is queued behind the update."""

import pytest

from prime.config import build_config


def _cfg(*overrides):
    return build_config({}, ["trainer.batch_size=8", "rollout.n=4", *overrides])


@pytest.mark.parametrize("overrides, has_prm, skip", [
    ((), False, True),                                             # one epoch over the whole batch
    (("actor.mini_batch_size=32",), False, True),                  # a mini-batch of the whole batch
    (("actor.mini_batch_size=16",), False, False),                 # two optimizer steps: the second is off-policy
    (("actor.ppo_epochs=2",), False, False),                       # a second epoch is off-policy
    (("actor.old_logprob_pass=always",), False, False),            # asked for
    (("prm.ref=policy",), True, False),                            # the PRM reads old_logp before the update
    (("prm.ref=frozen",), True, True),
])
def test_on_policy_update(overrides, has_prm, skip):
    from launch.train import on_policy_update

    assert on_policy_update(_cfg(*overrides), has_prm) is skip


def test_bad_old_logprob_pass_names_the_valid_values():
    with pytest.raises(Exception, match="old_logprob_pass.*(auto|always)"):
        _cfg("actor.old_logprob_pass=never")


@pytest.mark.parametrize("every, first, checked", [
    (10, 1, [1, 10, 20, 30, 40]),  # a fresh run: its first step, then the multiples of 10
    (10, 23, [23, 30, 40]),      # resumed after step 22: the first step checks the restored weights
    (1, 1, list(range(1, 41))),  # every step
    (0, 1, []),                  # never
])
def test_logprob_check_schedule(every, first, checked):
    from launch.train import checks_logprobs

    cfg = _cfg(f"rollout.logprob_check_every={every}")
    assert [s for s in range(first, 41) if checks_logprobs(cfg, s, first=s == first)] == checked


@pytest.mark.parametrize("overrides, queued", [
    ((), True),                                   # the sync goes right behind the update
    (("rollout.enable_sleep_mode=true",), False),  # the engines' weights wake first
    (("cluster.offload_trainers=true",), False),   # the sync runs before the trainers' states leave
])
def test_weight_sync_queued_behind_the_update(overrides, queued):
    from launch.train import queued_sync

    assert queued_sync(_cfg(*overrides)) is queued
