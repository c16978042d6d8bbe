"""Reference role (only when a KL term is on): a frozen copy of the initial policy giving ref log-probs."""

from __future__ import annotations

import time

import torch


class ReferenceWorker:
    def __init__(self, model_path: str, dtype: str = "float32", max_tokens_per_micro_batch: int = 16384,
                 temperature: float = 1.0) -> None:
        from prime.models.loading import load_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, dtype=dtype, device=str(self.device)).eval()
        self.model.requires_grad_(False)
        self.max_tokens = max_tokens_per_micro_batch
        self.temperature = temperature

    def compute_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        from prime.train.forward import batched_logprobs

        t0 = time.perf_counter()
        logp = batched_logprobs(self.model, batch, self.max_tokens, device=self.device, temperature=self.temperature)
        return logp, time.perf_counter() - t0

    def shutdown(self) -> None:
        pass
