"""Compute accounting (DESIGN rule 7): forward FLOPs per token of an LLM, from its modules and config."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cascade.llm import LLM


def forward_flops_per_token(llm: "LLM", context_length: int) -> float:
    """PaLM's accounting for a forward pass: 2 FLOPs per matmul weight, plus attention.

    Matmul weights are the decoder layers' parameters plus the LM head (embedding lookups are
    free); attention over `context_length` keys costs 2 * 2 * layers * width * context per token.
    """
    layer_params = sum(p.numel() for p in llm.layers.parameters())
    head_params = llm.base_llm.get_output_embeddings().weight.numel()
    return 2.0 * (layer_params + head_params) + 4.0 * llm.num_layers * llm.dim * context_length
