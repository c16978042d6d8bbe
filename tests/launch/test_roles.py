"""What the actor groups are started with, from the config alone (no Ray)."""

from __future__ import annotations

import os

from launch.roles import engine_env
from prime.config import build_config
from tests.subprocess_env import child_env


def test_local_cpu_engines_split_the_cores():
    cores = os.cpu_count() or 1
    cfg = build_config({}, ["trainer.device=cpu", "rollout.num_engines=2"])
    # Two engines generating at once, each with every core, would run 2 x cores OpenMP threads.
    assert engine_env(cfg) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    many = build_config({}, ["trainer.device=cpu", f"rollout.num_engines={2 * cores + 1}",
                             "cluster.policy_world_size=1"])
    assert engine_env(many) == {"OMP_NUM_THREADS": "1"}  # never 0 threads


def test_one_engine_gpus_and_clusters_keep_the_job_settings():
    assert engine_env(build_config({}, ["trainer.device=cpu", "rollout.num_engines=1"])) == {}
    assert engine_env(build_config({}, ["trainer.device=cuda", "rollout.num_engines=2"])) == {}
    assert engine_env(build_config({}, ["trainer.device=cpu", "rollout.num_engines=2", "cluster.address=auto"])) == {}


def test_cpu_trainers_keep_their_heap_unless_told_to_release_it():
    from launch.roles import TRAINER_HEAP_ENV, trainer_env

    assert trainer_env(build_config({}, ["trainer.device=cpu"])) == TRAINER_HEAP_ENV  # the default: keep
    assert trainer_env(build_config({}, ["trainer.device=cpu", "cluster.trainer_heap=release"])) == {}
    assert trainer_env(build_config({}, ["trainer.device=cuda"])) == {}  # activations live in CUDA's allocator


def test_trainer_heap_must_be_keep_or_release():
    import pytest

    with pytest.raises(ValueError, match="trainer_heap"):
        build_config({}, ["cluster.trainer_heap=sometimes"])


# Six rounds of allocating, touching and freeing a 128 MiB tensor; per round: the minor page faults
# of the allocation, the resident size (bytes) while it lives and after it is freed.
HEAP_SCRIPT = """
import resource, torch
from prime.rollout.weight_transfer import process_memory
rss = lambda: process_memory()["rss"]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    f0 = faults(); x = torch.ones(128 * 2**20 // 4); f1 = faults(); peak = rss(); del x
    print(f1 - f0, peak, rss())
"""


def _heap_rounds(env_extra: dict[str, str]) -> list[tuple[int, int, int]]:
    import subprocess
    import sys

    env = child_env({k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, OMP_NUM_THREADS="1", **env_extra)
    out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [tuple(map(int, line.split())) for line in out.stdout.strip().splitlines()[-6:]]


def test_trainer_heap_env_keeps_freed_memory_for_the_next_pass():
    import platform

    import pytest

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the MALLOC_* settings are glibc's")
    from launch.roles import TRAINER_HEAP_ENV

    MiB, pages = 2**20, 128 * 2**20 // 4096
    kept = _heap_rounds(TRAINER_HEAP_ENV)
    # Kept: a freed tensor stays resident (8 MiB: other small allocations and frees in between), and
    # once the heap has grown (a 64-byte-aligned block needs a little more than the one freed before
    # it, so the first rounds may still take fresh pages) a new tensor of the same size reuses pages
    # that are already there: no page faults.
    assert all(after >= peak - 8 * MiB for _, peak, after in kept), kept
    assert kept[-1][0] < pages // 20 and kept[-2][0] < pages // 20, kept
    # glibc's defaults: a 128 MiB block is mapped on its own and unmapped when freed, every round.
    released = _heap_rounds({})
    assert all(after <= peak - 120 * MiB for _, peak, after in released), released


def test_cpu_actors_get_the_configured_openmp_spin_count():
    from launch.setup import DRIVER_KEEPS, library_env

    def spin(*overrides: str) -> str | None:
        return library_env(build_config({}, list(overrides))).get("GOMP_SPINCOUNT")

    assert spin("trainer.device=cpu") == "10000"  # the default
    assert spin("trainer.device=cpu", "cluster.omp_spincount=0") == "0"
    assert spin("trainer.device=cpu", "cluster.omp_spincount=-1") is None  # libgomp's own default
    assert spin("trainer.device=cuda") is None
    assert "GOMP_SPINCOUNT" in DRIVER_KEEPS  # the driver's torch has loaded its OpenMP already


def test_omp_spincount_below_minus_one_is_refused():
    import pytest

    with pytest.raises(ValueError, match=r"cluster.omp_spincount must be >= 0 \(spins\), or -1 .*got -2"):
        build_config({}, ["cluster.omp_spincount=-2"])


# 100 rounds of a 2-thread matmul followed by 2 ms asleep; prints how often the threads other than
# the main one went to sleep (voluntary context switches) during them.
SPIN_SCRIPT = """
import os, time, torch
x = torch.randn(256, 256)
for _ in range(20):
    x @ x
def sleeps():
    n = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            with open(f"/proc/self/task/{tid}/status") as f:
                n += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return n
s0 = sleeps()
for _ in range(100):
    x @ x
    time.sleep(0.002)
print(sleeps() - s0)
"""


def test_torch_openmp_threads_sleep_after_the_configured_spin_count():
    """torch's OpenMP (libgomp) reads GOMP_SPINCOUNT, which `cluster.omp_spincount` sets: with 10,000
    spins its second thread goes to sleep after each matmul (about 220 times in 100 rounds on a
    2-core box), with 10^9 it spins through every 2 ms pause and never sleeps. Counting sleeps, not
    time, keeps the test independent of the machine's speed and load."""
    import subprocess
    import sys

    import pytest

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores: one OpenMP thread has nobody to wait for")

    def sleeps(spins: str) -> int:
        env = child_env({k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
                        OMP_NUM_THREADS="2", GOMP_SPINCOUNT=spins)
        out = subprocess.run([sys.executable, "-c", SPIN_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    brief, endless = sleeps("10000"), sleeps(str(10**9))
    assert brief >= 100 and endless <= 10, (brief, endless)  # at least once a round, against (almost) never
