"""The identity start of LLM k+1: before any training, it predicts exactly what LLM k does on the tokens it receives.

LLM k hands over its residual stream before the final norm (`LLM.hands_over_residual`); LLM k+1 gets copies of LLM
k's final norm and LM head, its position embeddings (if it adds any to its inputs) set to zero, and the output
projection of every attention and MLP block set to zero, so that each block adds nothing to the residual stream: the
hidden state reaches LLM k+1's final norm unchanged, and its logits are LLM k's. Training then starts from LLM k's
predictions rather than from chance. Each LLM keeps its own weights (these are copies).

The same device as ReZero (Bachlechner et al. 2020) and as zero-initialised residual branches in "Fixup" (Zhang et
al. 2019) and in progressive stacking of depth (Gong et al. 2019, "Efficient Training of BERT by Progressively
Stacking"); here the added depth is a separate LLM that sees only the tokens handed on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from cascade.llm import LLM

# the last projection of an attention or MLP block, whose output is added to the residual stream, by family:
# GPT-2 / GPT-J (c_proj, out_proj, fc_out), Llama / Mistral / Qwen / Gemma (o_proj, down_proj), GPT-NeoX (dense,
# dense_4h_to_h), OPT / Phi (out_proj, fc2, dense)
OUTPUT_PROJECTIONS = ("c_proj", "o_proj", "down_proj", "out_proj", "fc_out", "dense_4h_to_h", "fc2", "dense")
POSITION_EMBEDDINGS = ("wpe", "embed_positions")  # learned positions added to the inputs (GPT-2, OPT)


@torch.no_grad()
def identity_start(llm: "LLM", previous: "LLM") -> None:
    """Set `llm` (LLM k+1) so that, on the residual streams `previous` (LLM k) hands over, it predicts exactly what
    `previous` does, and check it on a probe.

    Raises:
        ValueError: the two LLMs differ in width or vocabulary, `previous` does not hand over its residual stream,
            `llm`'s family has blocks whose output projections are not known here, or the check fails (a family that
            transforms its input embeddings, e.g. by scaling them).
    """
    if not previous.hands_over_residual:
        raise ValueError("the identity start needs LLM k to hand over its residual stream before the final norm")
    head, previous_head = llm.base_llm.get_output_embeddings(), previous.base_llm.get_output_embeddings()
    if llm.dim != previous.dim or head.weight.shape != previous_head.weight.shape:
        raise ValueError(
            f"the identity start copies LLM k's head into LLM k+1: widths {previous.dim} and {llm.dim}, heads "
            f"{tuple(previous_head.weight.shape)} and {tuple(head.weight.shape)} must be equal"
        )
    for target, source in zip(llm.final_norm_parameters, previous.final_norm_parameters, strict=True):
        target.copy_(source)
    for target, source in zip(head.parameters(), previous_head.parameters(), strict=True):
        target.copy_(source)
    for i, layer in enumerate(llm.layers):
        projections = [m for name, m in layer.named_modules() if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS]
        if not projections:
            raise ValueError(
                f"the identity start does not know the output projections of {type(layer).__name__} (layer {i}); it "
                f"knows modules named {', '.join(OUTPUT_PROJECTIONS)}"
            )
        for module in projections:
            for p in module.parameters(recurse=False):
                p.zero_()
    for name, module in llm.base_llm.named_modules():
        if name.rsplit(".", 1)[-1] in POSITION_EMBEDDINGS and isinstance(module, nn.Embedding):
            module.weight.zero_()
    _check(llm, previous)


def _check(llm: "LLM", previous: "LLM") -> None:
    """LLM k+1's logits on a random residual stream equal LLM k's (through its final norm and head)."""
    generator = torch.Generator().manual_seed(0)
    dtype = llm.base_llm.get_input_embeddings().weight.dtype
    stream = torch.randn(1, 8, llm.dim, generator=generator).to(llm.device, dtype)
    was_training = llm.training
    llm.eval()
    try:
        h_out, _ = llm(stream, "hidden_states")
        expected = previous.get_logits(previous.final_norm(stream.to(previous.device)))
        got = llm.get_logits(h_out)
    finally:
        llm.train(was_training)
    if not torch.allclose(got.float().cpu(), expected.float().cpu(), rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"the identity start did not reproduce LLM k's logits in {type(llm.base_llm).__name__} (largest difference "
            f"{(got.float().cpu() - expected.float().cpu()).abs().max():.3g}): its blocks or input embeddings do more than "
            "this start undoes; train LLM k+1 from a fresh start instead"
        )
