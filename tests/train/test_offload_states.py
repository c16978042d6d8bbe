"""Which states `offload_engine_states` asks DeepSpeed to move, for each offload setting (no GPU needed:
a stand-in engine records the calls DeepSpeed would get)."""

from types import SimpleNamespace

import pytest

pytest.importorskip("deepspeed")
from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as S  # noqa: E402

from prime.train.engine import offload_engine_states, reload_engine_states  # noqa: E402


class TorchAdamW:  # stands for torch.optim.AdamW inside DeepSpeed's ZeRO optimizer
    state: dict = {}


class FusedAdam:
    state: dict = {}


class StandInEngine:
    def __init__(self, stage: int, cpu_optimizer: bool = False, param_offload: bool = False, inner=TorchAdamW):
        self.stage, self.cpu_optimizer, self.param_offload = stage, cpu_optimizer, param_offload
        self.optimizer = SimpleNamespace(optimizer=inner(), fp32_partitioned_groups_flat=[])
        self.device = "cpu"
        self.calls: list = []

    def zero_optimization_stage(self) -> int:
        return self.stage

    def zero_use_cpu_optimizer(self) -> bool:
        return self.cpu_optimizer

    def zero_offload_param(self):
        return SimpleNamespace(device=SimpleNamespace(value="cpu")) if self.param_offload else None

    def offload_states(self, include=None) -> None:
        self.calls.append(("offload", None if include is None else set(include)))

    def reload_states(self) -> None:
        self.calls.append(("reload",))


@pytest.mark.parametrize("engine, include", [
    (StandInEngine(2), None),  # ZeRO-1/2 move every kind themselves
    (StandInEngine(3, inner=FusedAdam), None),
    (StandInEngine(3), {S.lp_params, S.lp_grads, S.contiguous_grad_buffer}),  # fp32 states moved here
    (StandInEngine(3, cpu_optimizer=True), {S.lp_params, S.contiguous_grad_buffer}),  # the rest is on the host
    (StandInEngine(2, cpu_optimizer=True), {S.lp_params}),
])
def test_offload_asks_deepspeed_for_what_it_can_move(engine, include):
    offload_engine_states(engine)
    reload_engine_states(engine)
    assert engine.calls == [("offload", include), ("reload",)]


def test_parameter_offload_leaves_deepspeed_alone():
    # DeepSpeed asserts in offload_states when it offloads parameters itself (actor/prm.offload_params).
    engine = StandInEngine(3, cpu_optimizer=True, param_offload=True)
    offload_engine_states(engine)
    reload_engine_states(engine)
    assert engine.calls == []


def test_stage0_cannot_offload():
    with pytest.raises(ValueError, match="ZeRO stage 1, 2 or 3"):
        offload_engine_states(StandInEngine(0))
