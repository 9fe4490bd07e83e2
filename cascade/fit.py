"""Train a cascade stage by stage: `python -m cascade.fit --config configs/stage.yaml`.

Every `--trainer.*`, `--model.*` (StageModule), `--data.*` (TextDataModule) and `--handover.*`
(StageHandover) setting can be given in the YAML or overridden on the command line. A run
writes everything under `<runs_dir>/<name>/`: per stage `stage_k/` with TensorBoard logs,
checkpoints, the model in Hugging Face format (`llm/`, threshold in its config.json) and the
hard tokens handed to the next stage (`handover/`); at the end the ensemble is evaluated with
true early exit on the validation split and the table is written to `eval.json` (with
`--model.exit_layer`, also each layer's exit perplexity and a threshold sweep of LLM 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from callbacks.handover import StageHandover
from cascade.ensemble import Ensemble, stage_dir
from cascade.hf_models import max_positions
from cascade.layer_skip import layer_perplexities, threshold_sweep
from cascade.report import format_eval_table, format_layer_exit_table
from cascade.run_state import latest_checkpoint, mark_stage_done, stage_is_done
from cascade.shards import is_complete
from cascade.utils import default_precision, get_device
from datamodules.sequence import SequenceDataModule
from datamodules.text import TextDataModule
from lightning_modules.stage import StageModule


SWEEP_THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.01)  # 0: every token exits; 1.01: none does


class CascadeCLI(LightningCLI):
    """LightningCLI that trains stages 0..N-1 with a fresh Trainer each (or one stage with --stage)."""

    def __init__(self, args=None):
        super().__init__(
            StageModule,
            TextDataModule,
            run=False,
            args=args,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,  # hparams must be each stage's own arguments (stage k, its lr)
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"precision": default_precision(), "gradient_clip_val": 1.0},
            parser_kwargs={"description": __doc__},
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=str, default="cascade", help="Run name: everything goes to <runs_dir>/<name>/.")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Parent directory of runs.")
        parser.add_argument("--num_stages", type=int, default=2, help="Number of LLMs in the cascade.")
        parser.add_argument(
            "--stage", type=Optional[int], default=None,
            help="Train only stage k (it reads stage k-1's hand-over); default: every stage in turn.",
        )
        parser.add_argument("--eval_batch_size", type=Optional[int], default=None, help="Rows per batch in the final evaluation.")
        parser.add_argument(
            "--ckpt_path", type=Optional[str], default=None,
            help="Checkpoint to resume the first stage trained from ('last' or a path). By default an unfinished "
            "stage resumes from its newest checkpoint and finished stages are skipped.",
        )
        parser.add_lightning_class_args(StageHandover, "handover")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 100})
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        """Nothing here: every stage instantiates its own model, data and Trainer in `fit_stage`."""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.runs_dir) / self.config.name

    def run(self) -> dict | None:
        config = self.config
        if config.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {config.num_stages}")
        if config.stage is not None:
            if not 0 <= config.stage < config.num_stages:
                raise ValueError(f"stage {config.stage} is not one of the {config.num_stages} stages (0..{config.num_stages - 1})")
            previous = stage_dir(self.run_dir, config.stage - 1) / "handover"
            if config.stage > 0 and not is_complete(previous / "train"):
                raise FileNotFoundError(
                    f"stage {config.stage} reads {previous}, which does not exist: train stage {config.stage - 1} first"
                )
        stages = range(config.num_stages) if config.stage is None else [config.stage]
        ckpt_path = config.ckpt_path
        for k in stages:
            if ckpt_path is None and stage_is_done(stage_dir(self.run_dir, k)):
                rank_zero_info(f"stage {k}: complete in {stage_dir(self.run_dir, k)} (checked against its manifests), skipped")
                continue
            self.fit_stage(k, ckpt_path)
            ckpt_path = None
        if rank_zero_only.rank != 0:
            return None
        return self.evaluate(TextDataModule(**config.data.as_dict()), num_llms=stages[-1] + 1)

    def fit_stage(self, k: int, ckpt_path: str | None) -> None:
        """Train stage k with a fresh model, data module and Trainer (resuming from `ckpt_path` or the stage's
        newest checkpoint); save its LLM in HF format and mark it done."""
        stage_path = stage_dir(self.run_dir, k)
        config = self.config.clone()
        config.model.stage = k
        config.handover.output_dir = str(stage_path / "handover")
        config.checkpoint.dirpath = str(stage_path / "checkpoints")
        self.config_init = self.parser.instantiate_classes(config)
        text, model = self.config_init.data, self.config_init.model
        limit = max_positions(model.llm.config)
        if limit is not None and text.seq_len > limit:
            raise ValueError(f"data.seq_len {text.seq_len} exceeds the model's {limit} positions; lower it or enlarge the model")
        if k == 0:
            datamodule = text
        else:
            datamodule = SequenceDataModule(
                str(stage_dir(self.run_dir, k - 1) / "handover"), text.batch_size, text.seq_len, text.num_workers, text.seed
            )
        overrides = {"default_root_dir": str(stage_path)}
        if self.config_init.trainer.get("logger") in (None, True):
            overrides["logger"] = TensorBoardLogger(str(self.run_dir), name=f"stage_{k}", version="")
        saved, self.config = self.config, config  # SaveConfigCallback writes the stage's resolved config
        self.trainer = self.instantiate_trainer(**overrides)
        self.config = saved
        if ckpt_path is None and (resume := latest_checkpoint(stage_path / "checkpoints")) is not None:
            rank_zero_info(f"stage {k}: resuming from {resume}")
            ckpt_path = str(resume)
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        if self.trainer.is_global_zero:
            model.llm.save_pretrained(stage_path / "llm")
            text.save_tokenizer(self.run_dir / "tokenizer")
            handover = self.config_init.handover
            mark_stage_done(stage_path, {"stage": k, "global_step": self.trainer.global_step, **handover.stats})
        self.trainer.strategy.barrier()

    def evaluate(self, text: TextDataModule, num_llms: int) -> dict:
        """True early exit of the trained ensemble on the validation split; prints the table, writes eval.json."""
        ensemble = Ensemble.from_pretrained(self.run_dir, num_llms=num_llms).to(get_device())
        batch_size = self.config.eval_batch_size or text.batch_size
        stats = ensemble.evaluate(text.token_batches("validation", batch_size), batch_size)
        print(f"\nTrue early-exit evaluation of {self.run_dir} on the validation split:")
        print(format_eval_table(stats))
        if (exit_layer := self.config.model.exit_layer) is not None:
            llm, data = ensemble.llms[0], text.val_data
            thresholds = sorted({*SWEEP_THRESHOLDS, self.config.model.routing_threshold})
            stats["layer_exits"] = {
                "llm": 0, "exit_layer": exit_layer, "layer_ppl": layer_perplexities(llm, data, batch_size),
                "sweep": threshold_sweep(llm, data, batch_size, exit_layer, thresholds),
            }
            print(format_layer_exit_table(stats["layer_exits"]))
        (self.run_dir / "eval.json").write_text(json.dumps(stats, indent=2))
        print(f"written to {self.run_dir / 'eval.json'}; dashboards: tensorboard --logdir {self.run_dir}")
        return stats


def main(args=None) -> dict | None:
    return CascadeCLI(args).run()


if __name__ == "__main__":
    main()
