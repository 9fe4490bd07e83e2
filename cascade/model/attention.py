"""The LLM builds its rows' attention masks itself, and transformers builds none.

- Rows that are one causal sequence each get no mask, so SDPA runs its `is_causal` kernel, which skips
  the blocks above the diagonal. transformers itself builds a 4D causal mask under `torch.compile` on
  torch < 2.14 (it cannot tell compiling from exporting there), and training is slower with it
  (`benchmarks/ab_attention.py`; figures in `docs/benchmarks.md`). With no mask there is also nothing
  for transformers to check in eager mode, where its checks of the positions and the mask make the CPU
  wait for the GPU.
- Rows of packed sequences get a block-causal mask built from their segment ids: a flex-attention
  `BlockMask` when training on a GPU (flex attention skips the blocks the mask leaves empty), and a 4D
  boolean mask for SDPA otherwise (flex attention has no backward on the CPU).

`own_masks(model)` switches a model with SDPA attention to `ATTENTION`, an attention function
registered with transformers' attention functions but not with its mask functions, which is how
transformers lets an attention backend take no mask from it. Only models whose layers all attend
causally over the whole sequence are switched; others (sliding windows, chunked attention) keep
transformers' masks. Once switched, the model ignores any 2D padding mask given to it directly, so
call it through `LLM.forward`, with segment ids for padding. The switch is not saved: a model saved
afterwards loads with SDPA.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from cascade.data.packing import block_causal_mask

ATTENTION = "cascade_sdpa"  # "sdpa" in the name: transformers then checks the model supports SDPA

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
    from transformers.integrations.flex_attention import flex_attention_forward
except ImportError:  # torch < 2.5
    BlockMask = None


def _attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, block_mask=None, **kwargs):
    """SDPA, or flex attention when a `block_mask` comes (as a keyword of its own: GPT-2's forward reads
    `attention_mask.ndim`, which a BlockMask lacks, and every model passes unknown keywords down to here)."""
    if block_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("dropout", 0.0) > 0:  # flex attention has no dropout: SDPA on the same mask, materialised
        B, _, T, S = block_mask.shape
        dense = create_mask(block_mask.mask_mod, B, None, T, S, device=query.device)
        return sdpa_attention_forward(module, query, key, value, dense, **kwargs)
    return flex_attention_forward(module, query, key, value, block_mask, **kwargs)


AttentionInterface.register(ATTENTION, _attention)


def _alibi(config) -> bool:
    """Whether the model adds ALiBi's position bias to the attention mask (BLOOM always; Falcon and MPT optionally)."""
    attn_config = getattr(config, "attn_config", None)
    return (config.model_type == "bloom" or bool(getattr(config, "alibi", False))
            or bool(getattr(attn_config, "alibi", False)))


def full_causal_attention(config) -> bool:
    """Whether every layer attends causally to the whole sequence with no bias in its mask (no sliding window, chunk,
    bidirectional layer or ALiBi, whose bias transformers adds to the mask it builds)."""
    if not getattr(config, "is_causal", True) or getattr(config, "is_encoder_decoder", False) or _alibi(config):
        return False
    if getattr(config, "sliding_window", None) is not None or getattr(config, "attention_chunk_size", None) is not None:
        return False
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())


def own_masks(model: PreTrainedModel) -> bool:
    """Switch `model` (SDPA attention, full causal layers) to `ATTENTION`; True if it now takes its masks from us."""
    config = model.config.get_text_config()
    if model.config._attn_implementation == ATTENTION:
        return True
    if model.config._attn_implementation != "sdpa" or not full_causal_attention(config):
        return False
    model.set_attn_implementation(ATTENTION)
    return True


def wants_flex_attention(config, training: bool, cuda: bool, routed: bool) -> bool:
    """Whether packed rows get a flex-attention `BlockMask` rather than a 4D mask to SDPA: in training on a GPU, inside
    `torch.compile` (eager, flex attention and its mask run PyTorch's reference path, far slower than SDPA) and with
    no attention dropout (flex attention has none: a 4D mask would be materialised from the BlockMask at every
    layer); not under Mixture-of-Depths (`routed`), which gathers 4D masks per layer."""
    dropout = getattr(config, "attn_pdrop", None) or getattr(config, "attention_dropout", 0.0) or 0.0
    return training and cuda and not routed and torch.compiler.is_compiling() and not dropout


def flex_block_mask(segment_ids: Tensor) -> "BlockMask":
    """(B, T) segment ids -> a BlockMask of `block_causal_mask`: k <= q in the same segment (padding: segment -1)."""

    def mask_mod(b, h, q, k):
        return (segment_ids[b, q] == segment_ids[b, k]) & (k <= q)

    B, T = segment_ids.shape
    return create_block_mask(mask_mod, B, None, T, T, device=segment_ids.device)


def layer_kinds(config) -> list[str]:
    """The kinds of attention the model's layers use (transformers' `layer_types`; else one kind for every layer)."""
    if types := getattr(config, "layer_types", None):
        return sorted(set(types))
    return ["sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"]


def _segment_starts(segment_ids: Tensor) -> Tensor:
    """(B, T): the row index where each token's segment begins (segments are contiguous in their rows)."""
    T = segment_ids.shape[1]
    index = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    new = torch.ones_like(segment_ids, dtype=torch.bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.cummax(torch.where(new, index, torch.zeros_like(index)), dim=1).values


def _layer_kind_mask(allowed: Tensor, segment_ids: Tensor, kind: str, config) -> Tensor:
    """`allowed` (B, 1, T, T) narrowed to what a layer of attention `kind` sees (transformers' sliding-window and
    chunked overlays), counted within each token's own sequence in the row."""
    T = segment_ids.shape[1]
    q = torch.arange(T, device=segment_ids.device)[:, None]
    k = torch.arange(T, device=segment_ids.device)[None, :]
    if kind == "sliding_attention" and getattr(config, "sliding_window", None):
        return allowed & (q - k < config.sliding_window)
    if kind == "chunked_attention" and getattr(config, "attention_chunk_size", None):
        start = _segment_starts(segment_ids)[:, None, :, None]  # (B, 1, T, 1): the query's segment start
        chunk = config.attention_chunk_size
        return allowed & ((q - start) // chunk == (k - start) // chunk)
    return allowed


def packed_rows_mask(segment_ids: Tensor, implementation: str, flex: bool, dtype: torch.dtype, config=None) -> dict:
    """The keyword arguments that give a model of attention `implementation` the block-causal mask of `segment_ids`:
    a BlockMask for flex attention if `flex` (and the model owns its masks), else a 4D mask for SDPA or eager attention,
    one per kind of layer (sliding windows, chunks) where the model's layers differ (`config`)."""
    if implementation == ATTENTION and flex and BlockMask is not None:
        return {"block_mask": flex_block_mask(segment_ids)}
    allowed = block_causal_mask(segment_ids)
    if implementation not in (ATTENTION, "sdpa", "eager"):
        raise ValueError(
            f"packed or padded rows need attn_implementation 'sdpa' or 'eager', but the model uses {implementation!r}; "
            "load it with attn_implementation='sdpa'"
        )
    kinds = ["full_attention"] if implementation == ATTENTION or config is None else layer_kinds(config)
    if getattr(config, "layer_types", None) and implementation != ATTENTION:  # every standard kind the model may look up
        kinds = sorted({"full_attention", *kinds} | ({"sliding_attention"} if getattr(config, "sliding_window", None) else set())
                       | ({"chunked_attention"} if getattr(config, "attention_chunk_size", None) else set()))
    masks = {kind: _layer_kind_mask(allowed, segment_ids, kind, config) for kind in kinds}
    if implementation == "eager":
        masks = {kind: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)
                 for kind, m in masks.items()}
    if getattr(config, "layer_types", None) and implementation != ATTENTION:
        return {"attention_mask": masks}  # transformers takes one mask per kind of layer
    return {"attention_mask": next(iter(masks.values()))}


def rows_mask(x: Tensor, position_ids: Tensor | None, segment_ids: Tensor | None, implementation: str, flex: bool,
              dtype: torch.dtype, config=None) -> dict:
    """The mask keywords a backbone of attention `implementation` takes for rows `x` (B, T, ...): the block-causal
    mask of `segment_ids` (`packed_rows_mask`), or for rows that are one sequence each, none where that is plain
    causal attention."""
    if segment_ids is not None:
        return packed_rows_mask(segment_ids, implementation, flex, dtype, config)
    if position_ids is None or implementation == ATTENTION:
        return {}  # plain causal rows: SDPA's is_causal kernel
    # An explicit all-ones mask: with none, transformers would read gaps in position_ids
    # (normal at stage k > 0) as boundaries of packed sequences.
    return {"attention_mask": torch.ones(x.shape[:2], dtype=torch.long, device=x.device)}
