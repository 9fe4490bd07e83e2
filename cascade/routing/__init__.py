"""The routing layer, the method in its order: `scoring` (an LLM's pass over a SequenceData: exit scores, hidden
states, losses), `threshold` (the `hard_ratio` quantile), `compaction` (each sequence keeps its hard tokens),
`route` (the three together, for evaluation), `handover` (after a stage: the threshold from every process's scores,
then the hard tokens); then `evaluation` (true early exit), `diagnostics`, `learned_exit` (fitting the exit
classifier) and `layer_skip` (exits inside one LLM)."""
