"""The model layer: what cascade does with a Hugging Face CausalLM's own modules (building it, family checks,
attention masks, the hidden history, the decoder-layer loop, Mixture-of-Depths, FLOPs, the one place that applies
`torch.compile`). It knows nothing of routing or runs; its parts take an HF module, a list of layers or a logits
function, never the `LLM`."""
