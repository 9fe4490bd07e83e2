"""Settings of the Python API (`train_llm`, `train_ensemble`); the CLI reads the classes' own signatures instead."""

from __future__ import annotations

from dataclasses import dataclass, field


class TrainerConfig:
    """How each LLM of a cascade is trained by `train_llm` / `train_ensemble`.

    Args:
        batch_size: Rows per batch.
        lr: Stage 0's peak learning rate (stage k uses `lr * lr_decay ** k`); None: `StageModule`'s default.
        weight_decay: AdamW's weight decay; None: `StageModule`'s default.
        warmup_steps: Linear warm-up of the learning rate, in steps; None: `StageModule`'s default.
        hard_ratio: The fraction of each stage's training tokens handed to the next stage; None: `StageHandover`'s
            default.
        output_dir: Each stage's hand-over and logs go under `output_dir/stage_k/`; None writes nothing.
        **trainer: Lightning `Trainer` arguments, given to it as they are (`max_epochs`, `max_steps`, `accelerator`,
            `devices`, `precision`, `gradient_clip_val`, `enable_progress_bar`, ...), over the API's defaults (one
            epoch unless `max_steps` is given, on one device, clipping at 1.0, the machine's precision: `cascade.llm_trainer.API_TRAINER_DEFAULTS`).
    """

    def __init__(self, batch_size: int = 32, lr: float | None = None, weight_decay: float | None = None,
                 warmup_steps: int | None = None, hard_ratio: float | None = None, output_dir: str | None = None, **trainer):
        self.batch_size, self.lr, self.weight_decay, self.warmup_steps = batch_size, lr, weight_decay, warmup_steps
        self.hard_ratio, self.output_dir, self.trainer = hard_ratio, output_dir, trainer

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in {**vars(self), **self.trainer}.items() if k != "trainer")
        return f"TrainerConfig({fields})"


@dataclass
class ExperimentConfig:
    """One experiment: a cascade of `num_llms` LLMs of one architecture, trained on windows of `seq_len` tokens."""

    name: str = "experiment"
    model: str = "gpt2"
    model_config: dict = field(default_factory=dict)
    num_llms: int = 2
    seq_len: int = 128
    lr_decay: float | None = None  # None: StageModule's
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def build_ensemble(self, vocab_size: int):
        """Fresh LLMs from `model` / `model_config`, seeded, chained in an Ensemble."""
        from cascade.ensemble import Ensemble
        from cascade.model.hf_models import build_causal_lm
        from cascade.llm import LLM
        from cascade.utils import set_seed

        set_seed(self.seed)
        return Ensemble([LLM(build_causal_lm(self.model, self.model_config, vocab_size=vocab_size)) for _ in range(self.num_llms)])
