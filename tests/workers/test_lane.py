"""`workers.lane`: the driver's Unix-socket lane to an actor, on real Ray actors.

A lane must behave as the actor's Ray calls do: calls run in order on the actor's own thread,
their errors come back as the `RayTaskError` Ray would raise, a dead actor raises Ray's
`RayActorError`, and a Ray call through the group never waits behind an open lane.
"""

from __future__ import annotations

import os
import threading

import pytest

from workers.lane import LaneServer

pytestmark = pytest.mark.slow


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("this error does not pickle")


class EchoWorker(LaneServer):
    """A small actor with the lane verbs, as the roles have them."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def add(self, x: int, y: int = 0) -> int:
        self.seen.append(x)
        return x + y

    def history(self) -> list[int]:
        return list(self.seen)

    def thread(self) -> int:
        return threading.get_ident()

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def fail_unpicklable(self) -> None:
        raise Unpicklable("no")

    def lock(self):
        return threading.Lock()  # a result that does not pickle

    def die(self) -> None:
        os._exit(1)

    def pid(self) -> int:
        return os.getpid()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from workers.group import init_ray

    init_ray("local", num_cpus=4, env_vars={"OMP_NUM_THREADS": "1"})
    yield
    ray.shutdown()


@pytest.fixture
def group(ray_local):
    from workers.group import ActorGroup

    g = ActorGroup(EchoWorker, 2, name="echo", num_cpus=0.5)
    assert g.allow_lanes(True), "the actors run on the driver's node"
    yield g
    g.shutdown()


def test_calls_run_in_order_on_the_actors_own_thread(group):
    import ray

    from workers.lane import LaneError

    ray_thread = ray.get(group.actors[0].thread.remote())
    lanes = group.lanes()
    for x in range(5):
        lanes[0].submit("add", x, y=10)
    lanes[1].submit("add", 7)
    assert [lanes[0].result() for _ in range(5)] == [10, 11, 12, 13, 14]
    assert lanes[1].result() == 7
    lanes[0].submit("thread")
    assert lanes[0].result() == ray_thread  # the verbs run where Ray runs the actor's calls
    # A Ray call through the group closes the lanes first instead of waiting behind them forever.
    assert ray.get(group.actors[0].history.remote(), timeout=30) == [0, 1, 2, 3, 4]
    assert group._lanes is None
    again = group.lanes()  # opened anew on the next use
    again[1].submit("history")
    assert again[1].result() == [7]
    # A call still running when a Ray call closes the lanes keeps its reply.
    again[0].submit("add", 100)
    assert ray.get(group.actors[0].history.remote(), timeout=30)[-1] == 100
    assert again[0].result() == 100
    with pytest.raises(LaneError, match="closed"):
        again[0].submit("add", 1)


def test_a_verbs_error_comes_back_as_rays_task_error(group):
    import ray

    lane = group.lanes()[0]
    lane.submit("fail", "bad value 3")
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        lane.result()
    assert isinstance(info.value, ValueError) and "bad value 3" in str(info.value)
    lane.submit("fail_unpicklable")  # an error that does not pickle travels as its text
    with pytest.raises(ray.exceptions.RayTaskError, match="Unpicklable"):
        lane.result()
    lane.submit("lock")  # so does a result that does not pickle
    with pytest.raises(ray.exceptions.RayTaskError, match="pickle"):
        lane.result()
    lane.submit("add", 1, 2)  # the lane still works after each
    assert lane.result() == 3


def test_a_dead_actor_raises_rays_actor_error(group):
    import ray

    lane = group.lanes()[1]
    lane.submit("die")
    with pytest.raises(ray.exceptions.RayActorError):
        lane.result()
    assert lane.broken
    group.close_lanes(timeout_s=5.0)  # closing a dead actor's lane does not hang


def test_an_interrupted_read_breaks_the_lane_and_the_group_opens_a_new_one(group):
    from workers.lane import LaneError

    lanes = group.lanes()
    with pytest.raises(LaneError, match="no call is waiting"):
        lanes[0].result()
    lanes[0].submit("add", 1)
    # Stand-in for an exception raised in the driver in the middle of a read (preemption's deadline).
    real = lanes[0]._sock

    class Interrupting:
        def recv_into(self, *a, **k):
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(real, name)

    lanes[0]._sock = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        lanes[0].result()
    lanes[0]._sock = real
    assert lanes[0].broken
    fresh = group.lanes()
    assert fresh is not lanes and not fresh[0].broken
    fresh[0].submit("add", 5, 5)
    assert fresh[0].result() == 10
