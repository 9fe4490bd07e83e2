"""Settings of the Python API (`train_llm`, `train_ensemble`); the CLI reads the classes' own signatures instead."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerConfig:
    """How each LLM of a cascade is trained by `train_llm` / `train_ensemble`.

    `lr` is stage 0's peak learning rate (stage k uses `lr * lr_decay ** k`); `hard_ratio` is
    the fraction of each stage's training tokens handed to the next stage; with `output_dir`,
    each stage's hand-over and logs are written under `output_dir/stage_k/`.
    """

    batch_size: int = 32
    max_epochs: int = 1
    max_steps: int = -1
    lr: float = 6e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    gradient_clip_val: float = 1.0
    hard_ratio: float = 0.3
    accelerator: str = "auto"
    precision: str | None = None  # default: bf16-mixed on a GPU that supports it, else 32-true
    output_dir: str | None = None
    enable_progress_bar: bool = True


@dataclass
class ExperimentConfig:
    """One experiment: a cascade of `num_llms` LLMs of one architecture, trained on windows of `seq_len` tokens."""

    name: str = "experiment"
    model: str = "gpt2"
    model_config: dict = field(default_factory=dict)
    num_llms: int = 2
    seq_len: int = 128
    lr_decay: float = 0.5
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def build_ensemble(self, vocab_size: int):
        """Fresh LLMs from `model` / `model_config`, seeded, chained in an Ensemble."""
        from cascade.ensemble import Ensemble
        from cascade.hf_models import build_causal_lm
        from cascade.llm import LLM
        from cascade.utils import set_seed

        set_seed(self.seed)
        return Ensemble([LLM(build_causal_lm(self.model, self.model_config, vocab_size=vocab_size)) for _ in range(self.num_llms)])
