"""`workers.group.shard_groups`: contiguous shards of whole groups over data-parallel ranks."""

from __future__ import annotations

import pytest

from workers.group import shard_groups


def test_even_split():
    # 8 items in groups of 2 -> 4 groups, 2 per rank.
    assert shard_groups(8, 2, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_uneven_split_gives_earlier_ranks_the_extra_group():
    # 5 groups of 2 over 3 ranks: 5 = 2 + 2 + 1.
    assert shard_groups(10, 2, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_fewer_groups_than_ranks_leaves_empty_shards():
    assert shard_groups(4, 4, 3) == [[0, 1, 2, 3], [], []]


def test_one_rank_takes_everything():
    assert shard_groups(6, 3, 1) == [[0, 1, 2, 3, 4, 5]]


def test_shards_cover_every_item_once_and_keep_groups_whole():
    for n_groups in range(0, 9):
        for k in (1, 2, 4):
            for world in (1, 2, 3, 5):
                shards = shard_groups(n_groups * k, k, world)
                assert len(shards) == world
                assert [i for s in shards for i in s] == list(range(n_groups * k))
                assert all(len(s) % k == 0 for s in shards)
                sizes = [len(s) // k for s in shards]
                assert max(sizes) - min(sizes) <= 1


def test_items_not_in_whole_groups_are_rejected():
    with pytest.raises(ValueError, match="7 items"):
        shard_groups(7, 2, 2)


# --------------------------------------------------------------------------------------------------
# Placement on real nodes
# --------------------------------------------------------------------------------------------------


def test_match_nodes_gives_each_planned_node_its_own_ray_node():
    from workers.group import NodeInfo, PlacementError, match_nodes

    cpu_head = NodeInfo("a" * 56, "10.0.0.1", cpus=16, gpus=0, is_driver=True)
    gpu1 = NodeInfo("b" * 56, "10.0.0.2", cpus=64, gpus=8, is_driver=False)
    gpu2 = NodeInfo("c" * 56, "10.0.0.3", cpus=64, gpus=8, is_driver=False)
    nodes = [cpu_head, gpu1, gpu2]
    needs = [{"CPU": 48, "GPU": 8}, {"CPU": 48, "GPU": 8}, {"CPU": 0, "GPU": 0}]
    # GPU nodes for the two planned GPU nodes; nothing for a planned node without bundles.
    assert match_nodes(needs, nodes) == ["b" * 56, "c" * 56, None]
    # A third GPU node is missing: the sentence lists what the job needs and what the cluster has.
    with pytest.raises(PlacementError) as info:
        match_nodes(needs[:2] + [{"CPU": 8, "GPU": 8}], nodes)
    msg = str(info.value)
    assert "no free node for planned node 2 (8 CPU, 8 GPU)" in msg
    assert "node aaaaaaaa (10.0.0.1): 16 CPU, 0 GPU" in msg


def test_code_mismatches_name_the_node_that_differs():
    from workers.group import code_mismatches

    driver = ("0.1.0", "abc")
    reports = [("a" * 56, "10.0.0.1", ("0.1.0", "abc")), ("b" * 56, "10.0.0.2", ("0.1.0", "def"))]
    assert code_mismatches(driver, reports) == ["node bbbbbbbb (10.0.0.2) runs prime 0.1.0 with code def"]


@pytest.mark.slow
def test_a_placement_nobody_can_satisfy_ends_with_its_sentence_instead_of_hanging():
    import time

    import ray

    from workers.group import ActorGroup, PlacementError, create_placement_group, init_ray

    init_ray("local", num_cpus=2)  # bound to 127.0.0.1
    try:
        t0 = time.perf_counter()
        with pytest.raises(PlacementError) as info:
            create_placement_group("prime-test", [{"CPU": 1, "accelerator_nobody_has": 1}], timeout_s=2)
        waited = time.perf_counter() - t0
        assert "placement group prime-test (1 bundles, 1 CPU, 1 accelerator_nobody_has) was not ready within 2 s" \
            in str(info.value)
        assert waited < 30  # 2 s of waiting plus the removal; generous for a loaded 2-core machine
        assert ray.util.placement_group_table() and all(
            pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
        # The same through an actor group asking for more CPUs than the node has.
        with pytest.raises(PlacementError, match="prime-big .* was not ready within 1 s"):
            ActorGroup(object, 3, name="big", num_cpus=1.0, timeout_s=1)
    finally:
        ray.shutdown()


def test_a_node_that_cannot_see_the_run_folder_says_why(tmp_path):
    from workers.group import probe_shared_folder

    # The node-side half of the shared-output check: a node-local disk has no probe, or another one.
    missing = tmp_path / "not-here" / ".shared-check-x"
    assert probe_shared_folder(str(missing), "x") == f"cannot read {missing} (No such file or directory)"
    other = tmp_path / ".shared-check-y"
    other.write_text("written by another driver")
    assert probe_shared_folder(str(other), "y") == f"reads another {other} than the driver wrote"
