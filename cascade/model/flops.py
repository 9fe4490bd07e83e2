"""Compute accounting: forward FLOPs per token of a CausalLM, from its modules and config. A cascade's cost is the sum,
over its LLMs, of the tokens reaching each times its FLOPs per token."""

from __future__ import annotations

from transformers import PreTrainedModel

from cascade.model.families import decoder_layers


def forward_flops_per_token(model: PreTrainedModel, context_length: int, layers: float | None = None) -> float:
    """PaLM's accounting for a forward pass (Chowdhery et al. 2022, appendix B): 2 FLOPs per matmul weight, plus
    attention.

    Matmul weights are the decoder layers' parameters plus the LM head (embedding lookups are
    free); attention over `context_length` keys costs 2 * 2 * layers * width * context per token.
    `layers`: the decoder layers a token runs through, on average (fewer where Mixture-of-Depths routes it past some;
    the routers' own D FLOPs are left out); default all of them.
    """
    stack, dim = decoder_layers(model), model.config.get_text_config().hidden_size
    layers = len(stack) if layers is None else layers
    per_layer = 2.0 * sum(p.numel() for p in stack.parameters()) / len(stack) + 4.0 * dim * context_length
    return 2.0 * model.get_output_embeddings().weight.numel() + layers * per_layer
