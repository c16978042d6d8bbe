"""Checks of the cluster launchers in launch/cluster (no cluster needed).

Shell scripts must parse (`bash -n`) and, with `ray`, `srun`, `scontrol`, `hostname`, `python`
and `prime` replaced by stubs that log their arguments, must issue the expected commands.
The KubeRay manifest must parse as YAML with the expected structure.
"""

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "launch" / "cluster"
SCRIPTS = ["ray_head.sh", "ray_worker.sh", "slurm.sbatch"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse(name):
    run = subprocess.run(["bash", "-n", str(CLUSTER / name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.fixture
def stubs(tmp_path):
    """A bin folder of logging stubs, and the log they write to (one line per call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    bodies = {
        "ray": 'echo "ray $*" >> "$STUB_LOG"',
        "prime": 'echo "prime $* RAY_ADDRESS=$RAY_ADDRESS" >> "$STUB_LOG"',
        "scontrol": 'printf "n1\\nn2\\nn3\\n"',
        "hostname": 'echo "10.0.0.${STUB_HOST_SUFFIX:-1} 172.17.0.1"',
        # The sbatch's "alive nodes" probe: the number of `ray start` calls so far, once all three
        # background steps have made theirs (or after 5 s), as a real cluster reports joined nodes.
        "python": ('cat > /dev/null; for _ in $(seq 50); do '
                   '[[ $(grep -c "^ray start" "$STUB_LOG") -ge 3 ]] && break; sleep 0.1; done; '
                   'grep -c "^ray start" "$STUB_LOG"'),
        # srun: drop the options, remember the node, run the command there (here).
        "srun": ('node=""; while [[ $# -gt 0 && "$1" == -* ]]; do '
                 'if [[ "$1" == -w ]]; then node="$2"; shift 2; else shift; fi; done; '
                 'echo "srun $node: $*" >> "$STUB_LOG"; "$@"'),
    }
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "HOME": str(tmp_path)}
    return env, log


def test_ray_head_passes_settings_to_ray_start(stubs):
    env, log = stubs
    env.update(RAY_PORT="6380", RAY_NUM_GPUS="8", RAY_RESOURCES='{"rollout_node": 1}', RAY_BLOCK="1")
    subprocess.run(["bash", str(CLUSTER / "ray_head.sh")], env=env, check=True, capture_output=True)
    call = log.read_text().strip()
    assert call == ("ray start --head --node-ip-address=10.0.0.1 --port=6380 --dashboard-host=0.0.0.0 "
                    "--dashboard-port=8265 --ray-client-server-port=10001 --disable-usage-stats "
                    '--num-gpus=8 --resources={"rollout_node": 1} --block')


def test_ray_worker_needs_and_uses_the_head_address(stubs):
    env, log = stubs
    run = subprocess.run(["bash", str(CLUSTER / "ray_worker.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "set RAY_HEAD_ADDRESS" in run.stderr
    subprocess.run(["bash", str(CLUSTER / "ray_worker.sh"), "10.0.0.1:6379"], env=env, check=True,
                   capture_output=True)
    assert log.read_text().strip() == ("ray start --address=10.0.0.1:6379 --node-ip-address=10.0.0.1 "
                                       "--disable-usage-stats")


def test_slurm_script_starts_head_workers_then_the_driver(stubs):
    env, log = stubs
    env.update(SLURM_JOB_NODELIST="n[1-3]", SLURMD_NODENAME="n1", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_CPUS_PER_TASK="64", CONFIG="configs/x.yaml")
    run = subprocess.run(["bash", str(CLUSTER / "slurm.sbatch"), "algo.name=grpo", "rollout.n=8"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("srun n1:") and c.endswith("ray_head.sh") for c in calls)
    assert "ray start --head --node-ip-address=10.0.0.1 --port=6379" in "\n".join(calls)
    for worker in ("n2", "n3"):
        assert any(c.startswith(f"srun {worker}:") and c.endswith("ray_worker.sh") for c in calls)
    assert sum(c.startswith("ray start --address=10.0.0.1:6379") for c in calls) == 2
    assert calls[-1] == ("prime train configs/x.yaml cluster.nodes=3 algo.name=grpo rollout.n=8 "
                         "RAY_ADDRESS=10.0.0.1:6379")


def test_slurm_script_has_resource_lines():
    text = (CLUSTER / "slurm.sbatch").read_text()
    for option in ("--nodes=", "--gpus-per-node=", "--ntasks-per-node=1", "--time="):
        assert f"#SBATCH {option}" in text


def test_kuberay_manifest_parses_with_head_and_gpu_workers():
    doc = yaml.safe_load((CLUSTER / "kuberay_rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert "prime train configs/prime_7b.yaml" in spec["entrypoint"]
    # Two GPU worker pods: the job spreads over both and checkpoints to the volume every pod mounts.
    assert "cluster.nodes=2" in spec["entrypoint"] and "trainer.output_dir=/checkpoints" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} == {6379, 8265, 10001}
    (workers,) = cluster["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and workers["replicas"] >= 1


def test_readme_lists_every_launcher():
    readme = (CLUSTER / "README.md").read_text()
    for name in SCRIPTS + ["kuberay_rayjob.yaml"]:
        assert f"`{name}`" in readme


def _stub(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_script_passes_sigterm_to_the_driver_and_requeues(stubs, tmp_path):
    """SLURM's `--signal=B:TERM@...` reaches the batch script; the driver must get it, and after the
    driver's clean exit the job is requeued (a stub driver that exits 0 on SIGTERM stands in)."""
    import signal
    import time

    env, log = stubs
    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "prime", 'trap \'echo "prime got TERM" >> "$STUB_LOG"; kill $nap; exit 0\' TERM\n'
                            'echo "prime $*" >> "$STUB_LOG"\nsleep 60 > /dev/null 2>&1 & nap=$!\nwait')
    _stub(bin_dir, "scontrol", 'if [[ "$1" == requeue ]]; then echo "scontrol $*" >> "$STUB_LOG"; '
                               'else printf "n1\\nn2\\nn3\\n"; fi')
    env.update(SLURM_JOB_NODELIST="n[1-3]", SLURMD_NODENAME="n1", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="77",
               CONFIG="configs/x.yaml")
    proc = subprocess.Popen(["bash", str(CLUSTER / "slurm.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if log.exists() and "prime train" in log.read_text():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert "prime got TERM" in calls and calls[-1] == "scontrol requeue 77"
    text = (CLUSTER / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@360" in text and "#SBATCH --requeue" in text


def test_kuberay_head_gives_the_driver_its_grace_period():
    from prime.config import TrainerConfig

    doc = yaml.safe_load((CLUSTER / "kuberay_rayjob.yaml").read_text())
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    # The pod's grace covers the driver's default preemption grace (300 s) with room to spare.
    assert head["terminationGracePeriodSeconds"] > TrainerConfig().preempt_grace_s
    hook = " ".join(head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
    # The driver writes driver.pid into <output_dir>/<run_name>: /checkpoints (entrypoint) / prime_7b (preset).
    assert "trainer.output_dir=/checkpoints" in doc["spec"]["entrypoint"]
    assert "/checkpoints/prime_7b/driver.pid" in hook and "kill -TERM" in hook
    preset = yaml.safe_load((REPO / "configs" / "prime_7b.yaml").read_text())
    assert preset["trainer"]["run_name"] == "prime_7b"
