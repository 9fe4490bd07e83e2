"""The data layer: batches, packing, storage and shards; tensors and files only (torch and numpy), no models.

Above it, in order: `cascade.model`, the seed's objects (`cascade.llm`, `cascade.ensemble`), `cascade.training`,
`cascade.routing`, the Lightning folders, `cascade.run` (tests/unit/test_layers.py checks the direction).
"""
