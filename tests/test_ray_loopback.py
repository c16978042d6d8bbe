"""A local Ray instance lives on loopback: its node, and so MASTER_ADDR of every group, is 127.0.0.1."""

import pytest

pytestmark = pytest.mark.slow


def test_local_ray_and_ranked_workers_use_loopback():
    import ray

    from workers.group import RankedWorker, init_ray

    init_ray("local", num_cpus=2)
    try:
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        actor = ray.remote(RankedWorker).remote()
        ip, port = ray.get(actor.master_address.remote())
        assert ip == "127.0.0.1" and port > 0
    finally:
        ray.shutdown()
