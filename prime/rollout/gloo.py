"""Gloo process groups of one rank that share one transport device (one polling thread for all)."""

from __future__ import annotations

import contextlib

_GLOO_DEVICE = None  # the gloo device this process's single-rank groups share (`one_gloo_device`)


@contextlib.contextmanager
def one_gloo_device():
    """While active, every new gloo process group uses one transport device, shared by all such
    groups of this process, instead of making its own.

    Each gloo device runs an event-loop thread that wakes every 10 ms whether or not it has work.
    vLLM's in-process CPU engine creates 13 single-rank groups (world, tensor-, pipeline-, data-,
    expert-parallel and more, each a device group plus a CPU group), and a one-rank DeepSpeed
    trainer two: as many threads, each waking 100 times a second. On a machine whose cores the
    trainer keeps busy, every wake-up preempts one of its threads (bench/idle_wakeups.py). A
    single-rank group sends nothing, so sharing one device costs it nothing. Only for groups of one
    rank: the groups that carry data between processes keep their own devices.
    """
    from torch.distributed import distributed_c10d as c10d

    global _GLOO_DEVICE
    gloo = c10d.ProcessGroupGloo
    if _GLOO_DEVICE is None:
        _GLOO_DEVICE = gloo.create_default_device()  # what each group would make for itself
    device = _GLOO_DEVICE

    class SharedDeviceGloo(gloo):
        def __init__(self, store, rank, size, timeout=None):
            options = gloo._Options()
            options._devices = [device]
            if timeout is not None:
                options._timeout = timeout
            super().__init__(store, rank, size, options)

    c10d.ProcessGroupGloo = SharedDeviceGloo
    try:
        yield
    finally:
        c10d.ProcessGroupGloo = gloo
