"""Reference role (only when a KL term is on): a frozen copy of the initial policy giving ref log-probs."""

from __future__ import annotations

import numpy as np
import torch

from prime.data.batch import Batch
from prime.train.batching import make_micro_batches
from prime.train.trainer import forward_rows
from workers.training import timed, wire


class ReferenceWorker:
    def __init__(self, model_path: str, *, dtype: str, max_tokens_per_micro_batch: int, temperature: float,
                 trust_remote_code: bool = False, padding_free: bool = False, share_prompts: bool = False) -> None:
        from prime.models.loading import load_model
        from prime.models.packing import PACKED_ATTENTION, use_packed_attention

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, dtype=dtype, device=str(self.device), trust_remote_code=trust_remote_code)
        self.model.requires_grad_(False)
        self.share_prompts = False
        if padding_free:
            self.share_prompts = use_packed_attention(self.model) == PACKED_ATTENTION and share_prompts
        self.max_tokens = max_tokens_per_micro_batch
        self.temperature, self.padding_free = temperature, padding_free

    @torch.no_grad()
    def _logprobs(self, batch: Batch) -> torch.Tensor:
        out = torch.zeros(batch.response_mask.shape)  # [B, T]
        groups = batch.group_ids.tolist() if self.share_prompts and batch.group_ids is not None else None
        for rows in make_micro_batches(batch.lengths(), self.max_tokens, groups, padding_free=self.padding_free):
            out[torch.as_tensor(rows)] = forward_rows(self.model, batch, rows, device=self.device, temperature=self.temperature,
                                                      padding_free=self.padding_free,
                                                      share_prompts=self.share_prompts).logp.float().cpu()
        return out

    def logprobs(self, batch: Batch) -> tuple[np.ndarray, float]:
        """Reference log-probs [B, T] and the seconds spent."""
        return timed(lambda: wire(self._logprobs(batch)))

    def shutdown(self) -> None:
        pass
