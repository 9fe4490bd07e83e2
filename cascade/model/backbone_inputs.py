"""What a Hugging Face backbone is given for rows of token ids or hidden states: the inputs, their
positions and the masks of the rows' segments (`cascade.model.attention`)."""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedModel

from cascade.model.attention import rows_mask

INPUT_TYPES = ("token_ids", "hidden_states")


def rows_inputs(
    model: PreTrainedModel,
    x: Tensor,
    input_type: str,
    position_ids: Tensor | None,
    segment_ids: Tensor | None,
    flex: bool,
) -> dict:
    """The keyword arguments for the backbone of `model` on token ids (B, T) or hidden states
    (B, T, D) `x`, at `position_ids`, with the masks of `segment_ids` (a flex-attention BlockMask
    where `flex` and the model takes one)."""
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    config = model.config.get_text_config()
    dtype = model.get_input_embeddings().weight.dtype
    if input_type == "token_ids":
        inputs = {"input_ids": x}
    elif x.shape[-1] != config.hidden_size:
        raise ValueError(
            f"hidden states of width {x.shape[-1]} given to an LLM of width {config.hidden_size}"
        )
    else:
        inputs = {"inputs_embeds": x.to(dtype)}
    implementation = model.config._attn_implementation
    masks = rows_mask(x, position_ids, segment_ids, implementation, flex, dtype, config)
    return {**inputs, "position_ids": position_ids, **masks, "use_cache": False}
