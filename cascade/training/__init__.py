"""The training layer: the next-token loss, layer-exit weights, optimizer groups and schedule, the warm start of a
later LLM. Functions of an `LLM` and tensors; Lightning calls them from `lightning_modules/`."""
