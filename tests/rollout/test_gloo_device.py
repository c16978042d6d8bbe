"""`prime.rollout.gloo.one_gloo_device`: process groups made inside it share one gloo device, so
one event-loop thread polls for all of them, and they still communicate."""

import json
import subprocess
import sys

from tests.subprocess_env import child_env

_SCRIPT = r"""
import json, socket, torch, torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from prime.rollout.gloo import one_gloo_device
from tests.proc_threads import threads_named

def loops():
    return threads_named("gloo_tcp_loop")

s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
original = c10d.ProcessGroupGloo
with one_gloo_device():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    groups = [dist.new_group([0]) for _ in range(6)]
inside = loops()
restored = c10d.ProcessGroupGloo is original
own = dist.new_group([0])  # made after the block: a device of its own
t = torch.arange(3.0)
for g in [None, *groups, own]:
    dist.all_reduce(t, group=g)
    dist.broadcast(t, src=0, group=g)
print(json.dumps({"inside": inside, "after": loops(), "restored": restored, "sum": t.tolist()}))
dist.destroy_process_group()
"""


def test_groups_share_one_device_and_still_communicate():
    env = child_env(GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # Seven groups (the default one and six more), one device: one loop thread. Without the block
    # each group starts its own (the group made after it adds one).
    assert got["inside"] == 1 and got["after"] == 2
    assert got["restored"]
    # One rank: all_reduce and broadcast leave the tensor as it was, through every group.
    assert got["sum"] == [0.0, 1.0, 2.0]
