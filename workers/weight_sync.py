"""Weight sync policy -> rollout engines after every update.

Two transports behind one function:

- object store (default; CPU and small models): policy rank 0 returns its full HF-named state dict,
  Ray stores it once, and every engine receives the same object reference, so the driver never
  holds the tensors.
- collective broadcast in buckets (`torch.distributed` group of policy rank 0 + one receiver per
  engine; gloo on CPU, NCCL on GPU): tensors are flattened into buckets of `bucket_mb` and broadcast
  from rank 0, each engine unflattens and loads them in place. See `BroadcastSync`.
"""

from __future__ import annotations

import ray

from workers.group import ActorGroup


def sync_weights(policy: ActorGroup, rollout: ActorGroup) -> None:
    """Object-store transport. Every policy rank takes part (ZeRO-3 gathers collectively)."""
    refs = policy.call_async(lambda a, r: a.named_weights.remote())
    ray.get(refs[1:])  # ranks > 0 return None once the gather is done
    ray.get([e.load_weights.remote(refs[0]) for e in rollout.actors])
