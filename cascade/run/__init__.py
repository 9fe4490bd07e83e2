"""The run layer: the stage loop as plain functions (`stages`), what a run directory says (`state`), each stage's
Trainer settings and record (`stage_runner`), atomic checkpoints, the evaluation after the last stage and its report.
The only part of `cascade/` that imports Lightning, with the Python API's trainers and `cascade/fit.py` (the CLI)."""
