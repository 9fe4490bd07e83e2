"""Batch: rows of packed or padded sequences, what `LLM.forward` and the training step read."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

IGNORE_INDEX = -100  # target of padding, ignored by cross-entropy


@dataclass
class Batch:
    """Rows of packed or padded sequences, ready for `LLM.forward`.

    Padding has target `IGNORE_INDEX`, segment -1 and token index -1.
    """

    inputs: Tensor  # (B, T) token ids or (B, T, D) hidden states
    targets: Tensor  # (B, T)
    position_ids: Tensor  # (B, T) original positions
    segment_ids: Tensor  # (B, T) which sequence of its row a token belongs to
    token_index: Tensor  # (B, T) index of the token in the SequenceData
    single_sequence_rows: bool  # every row is one sequence, unpadded: plain causal attention suffices
    num_tokens: int  # real (non-padding) tokens
    default_positions: bool = False  # also every row's positions are 0..T-1: the model needs neither mask nor positions

    @property
    def num_positions(self) -> int:
        return self.token_index.numel()

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> "Batch":
        """The batch on `device`; by default without blocking towards a GPU (Lightning moves an object with a `to`
        method by calling it with no `non_blocking`, so the CPU would wait for the last step before queuing the next)."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies (DataLoader's `pin_memory` calls this): the copy to the GPU then runs
        asynchronously instead of waiting for the GPU to finish the previous step."""
        return self._map(Tensor.pin_memory)

    @property
    def input_type(self) -> str:
        return "token_ids" if self.inputs.dim() == 2 else "hidden_states"

    def model_position_ids(self) -> Tensor | None:
        """The `position_ids` to give the model: None where they are the default 0..T-1 (plain causal rows)."""
        return None if self.default_positions else self.position_ids

    def model_segment_ids(self) -> Tensor | None:
        """The `segment_ids` to give the model: None where every row is one sequence (plain causal attention)."""
        return None if self.single_sequence_rows else self.segment_ids

    def _map(self, fn) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, Tensor) else v for k, v in values.items()})
