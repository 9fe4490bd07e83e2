"""Compute accounting (DESIGN rule 7): forward FLOPs per token of an LLM, from its modules and config."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cascade.llm import LLM


def forward_flops_per_token(llm: "LLM", context_length: int, layers: float | None = None) -> float:
    """PaLM's accounting for a forward pass: 2 FLOPs per matmul weight, plus attention.

    Matmul weights are the decoder layers' parameters plus the LM head (embedding lookups are
    free); attention over `context_length` keys costs 2 * 2 * layers * width * context per token.
    `layers`: the decoder layers a token runs through, on average (fewer where Mixture-of-Depths routes it past some;
    the routers' own D FLOPs are left out); default all of them.
    """
    layers = llm.num_layers if layers is None else layers
    per_layer = 2.0 * sum(p.numel() for p in llm.layers.parameters()) / llm.num_layers + 4.0 * llm.dim * context_length
    return 2.0 * llm.base_llm.get_output_embeddings().weight.numel() + layers * per_layer
