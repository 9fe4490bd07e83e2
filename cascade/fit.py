"""Train a cascade stage by stage: `python -m cascade.fit --config configs/stage.yaml`.

Every `--trainer.*`, `--model.*` (StageModule), `--data.*` (TextDataModule), `--handover.*` (StageHandover) and
`--router.*` (GainRouter: the rounds of a streamed stage k > 0) setting can be given in the YAML or overridden on the command line. A run writes everything under
`<runs_dir>/<name>/`: per stage `stage_k/` with TensorBoard logs, checkpoints, the model in Hugging Face format
(`llm/`, threshold in its config.json) and, where the hand-over is materialized (`--handover.mode`), the hard tokens
handed to the next stage (`handover/`; streamed, the next stage recomputes them from the corpus); at the end the
ensemble is evaluated with true early exit on the validation split and the table is written to `eval.json` (with
`--model.exit_layer`, also each layer's exit perplexity and a threshold sweep of LLM 0).
"""

from __future__ import annotations

import errno
import sys
from dataclasses import fields
from typing import Optional

from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from callbacks.gain_router import GainRouter
from callbacks.stage_handover import StageHandover
from cascade.data.atomic import free_bytes
from cascade.run import stages
from cascade.run.lock import RunDirectoryInUse, RunDirectoryUnwritable
from cascade.run.stage_runner import TRAINER_DEFAULTS
from cascade.run.stages import RunSettings, RunStopped, StageParts, run_cascade
from cascade.run.state import stage_dir, stage_settings
from datamodules.text import TextDataModule
from lightning_modules.stage import StageModule


RUNNER_OWNED = {  # a stage's index and directories, which each stage gets from the run: what to give instead
    "--model.stage": "--stage (the stage to train alone)",
    "--handover.output_dir": "--runs_dir and --name (the run writes under <runs_dir>/<name>/stage_k/)",
    "--checkpoint.dirpath": "--runs_dir and --name (the run writes under <runs_dir>/<name>/stage_k/)",
    "--trainer.default_root_dir": "--runs_dir and --name (the run writes under <runs_dir>/<name>/stage_k/)",
}


def first_stage(stage: int | None) -> int:
    return stage or 0  # the first stage a run trains: --stage, else 0


def run_directory(runs_dir: str, name: str) -> str:
    return str(stages.run_directory(runs_dir, name))


def streams_by_router(c) -> bool:
    """Whether the run's router settings (`GainRouter`) need every hand-over streamed."""
    return c.num_stages > 1 and (c.router.rounds > 1 or c.router.objective == "mixture")


def trained_settings(c) -> dict:
    """What defines a trained stage among a run's settings `c` (recorded in its `done.json`)."""
    shaping = ("max_steps", "max_epochs", "accumulate_grad_batches", "gradient_clip_val", "precision", "devices", "num_nodes",
               "limit_train_batches")  # the global batch and the numbers, not where or how fast
    trainer = {k: c.trainer[k] for k in shaping}
    return stage_settings({"model": c.model.as_dict(), "data": c.data.as_dict(), "handover": c.handover.as_dict(),
                           "router": c.router.as_dict(), "trainer": trainer, "": {"seed_everything": c.seed_everything}})


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
            save_config_callback=None,  # each stage saves its own resolved config, see `stage_parts`
            trainer_defaults=TRAINER_DEFAULTS,  # precision: chosen for the machine when a stage starts
            parser_kwargs={"description": __doc__, "prog": "python -m cascade.fit"},
        )

    def add_core_arguments_to_parser(self, parser) -> None:
        """LightningCLI's trainer, model and data arguments, less the model's `llm` (an object, for the Python API)."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items()})
        parser.add_class_arguments(StageModule, "model", fail_untyped=False, sub_configs=True, skip={"llm"})
        parser.add_lightning_class_args(TextDataModule, "data")

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
            "--eval_curve", type=bool, default=True,
            help="Also sweep the hand-over fraction at evaluation (a forward of every later LLM per point): the "
            "perplexity-vs-compute curve, in eval.json and eval_curve.png.",
        )
        parser.add_argument(
            "--eval_files", type=Optional[list[str]], default=None,
            help="Text files to evaluate on after the last stage (a test set, tokenized by the run's tokenizer) "
            "instead of the validation split.",
        )
        parser.add_argument(
            "--eval_routing_bound", type=bool, default=False,
            help="Also run each later LLM on every token reaching the one before, to report the oracle's perplexity at "
            "the same hand-over fraction beside each exit score's (eval.json llm_stats[k].routing_bound).",
        )
        parser.add_argument(
            "--ckpt_path", type=Optional[str], default=None,
            help="Checkpoint to resume the first stage trained from, held to the run's settings. By "
            "default (or 'last'): done stages skipped, others resumed from their newest one.",
        )
        parser.add_argument("--debug", type=bool, default=False, help="On an error, show its traceback, not only its message.")
        parser.add_class_arguments(StageHandover, "handover")  # a callback of the stages that hand over (not the last)
        parser.add_class_arguments(GainRouter, "router")  # a callback of the stages k > 0
        for setting in ("hard_ratio", "calibration_tokens"):  # the router hands on what the hand-over does
            parser.link_arguments(f"handover.{setting}", f"router.{setting}", apply_on="parse")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # "link": last.ckpt links to the step's checkpoint instead of writing the same state a second time
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.every_n_train_steps": 100})
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # What the stage runner sets for each stage: linked, so that --help and the configs leave them out; the runner
        # gives each stage its own (its index, its hand-over, checkpoint and log directories under the run's)
        parser.link_arguments("stage", "model.stage", compute_fn=first_stage, apply_on="parse")
        for target in ("handover.output_dir", "checkpoint.dirpath", "trainer.default_root_dir"):
            parser.link_arguments(("runs_dir", "name"), target, compute_fn=run_directory, apply_on="parse")

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's parsing, after refusing, with what to give instead, a setting the runner sets per stage."""
        for arg in args if isinstance(args, list) else sys.argv[1:] if args is None else []:
            key = str(arg).split("=", 1)[0]
            if key in RUNNER_OWNED:
                parser.error(f"{key} is set for each stage by the run itself; give {RUNNER_OWNED[key]} instead")
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        """Nothing here: every stage instantiates its own model, data and Trainer settings in `stage_parts`."""

    def run_settings(self) -> RunSettings:
        """The run's own settings; `--ckpt_path last` is what the run does by default (None): Lightning's last.ckpt
        may link to a checkpoint passed over as damaged, and a complete stage is skipped, not resumed."""
        settings = {f.name: self.config[f.name] for f in fields(RunSettings)}
        return RunSettings(**{**settings, "ckpt_path": None if settings["ckpt_path"] == "last" else settings["ckpt_path"]})

    def run(self) -> dict | None:
        """Train the stages not complete yet, then evaluate (`cascade.run.stages.run_cascade`)."""
        c = self.config
        if streams_by_router(c) and c.handover.mode == "materialize":
            raise ValueError("router.rounds > 1 or router.objective mixture choose a stage's tokens as it trains, so "
                             "they must be streamed through the LLMs before it: give --handover.mode stream (or auto)")
        if c.num_stages > 1 and c.router.rounds > 1 and not c.eval_files:
            rank_zero_warn("the gain router is fitted on the validation split, which the evaluation then reads too: "
                           "give --eval_files (text no stage sees) for an unbiased evaluation")
        return run_cascade(
            self.run_settings(), self.stage_parts, after_last_stage=c.handover.after_last_stage, settings=trained_settings(c),
            data_settings=c.data.as_dict(), trainer_settings=c.trainer, compile=c.model.compile,
            exit_layer=c.model.exit_layer, routing_threshold=c.model.routing_threshold,
        )

    def stage_parts(self, k: int, handover_only: bool) -> StageParts:
        """Stage k's objects from its settings (`stage_config`); its resolved config is saved to its log directory,
        unless it only hands over (it keeps its training's)."""
        config = self.stage_config(k, handover_only)
        objects = self.parser.instantiate(config)
        saver = [] if handover_only else [SaveConfigCallback(self.parser, config, overwrite=True)]
        return StageParts(objects.model, objects.data, objects.handover, objects.trainer, [*saver, objects.checkpoint],
                          objects.router)

    def stage_config(self, k: int, handover_only: bool):
        """The run's settings for stage k: its index, where its hand-over and checkpoints go, and (`handover_only`) its
        saved LLM loaded to hand over without training; seeds the stage."""
        stage_path = stage_dir(self.run_settings().run_dir, k)
        config = self.config.clone()
        config.model.stage = k
        config.handover.output_dir = str(stage_path / "handover")
        config.checkpoint.dirpath = str(stage_path / "checkpoints")
        if streams_by_router(config):  # the router chooses the next stage's tokens as it trains: never on disk
            config.handover.mode = "stream"
        if handover_only:
            config.model.model, config.model.pretrained, config.model.model_config = str(stage_path / "llm"), True, None
            config.trainer.max_steps = 0
        if isinstance(config.seed_everything, int) and not isinstance(config.seed_everything, bool):
            # the stage's initialisation and dropout depend on the run's seed and k alone, not on earlier stages
            seed_everything(config.seed_everything + k, workers=True, verbose=False)
        return config


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, RunDirectoryInUse, RunDirectoryUnwritable,
               FloatingPointError, MisconfigurationException)  # what settings and data cause (a diverged run included)
DISK_ERRORS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}
DISK_REMEDIES = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there or raise the quota",
                 errno.EROFS: "it cannot be written"}


def main(args=None) -> dict | None:
    return CascadeCLI(args).run()


def command_line() -> int:
    """`python -m cascade.fit`: exit status 0 once the run is complete. An error that the settings or the data cause,
    or a full disk, is one line on stderr (exit status 1; its traceback only with `--debug true`); a run stopped by
    SIGTERM says where it stopped (exit status 143)."""
    cli = CascadeCLI()
    try:
        cli.run()
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except (*USER_ERRORS, OSError) as e:
        disk = isinstance(e, OSError) and e.errno in DISK_ERRORS
        if cli.config.debug or not (disk or isinstance(e, USER_ERRORS)):
            raise
        print(f"error: {disk_error(e, cli.run_settings()) if disk else e}\n(run again with --debug true for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def disk_error(e: OSError, run: RunSettings) -> str:
    """One line for a disk that refused a write: the file, the free space where the run writes, and what to do."""
    where = e.filename or run.run_dir
    free = f" ({free_bytes(where) / 1e9:.3g} GB free there)" if e.errno != errno.EROFS else ""
    return (f"{DISK_ERRORS[e.errno]} writing {where}{free}: {DISK_REMEDIES[e.errno]}, or give --runs_dir (and "
            "--data.cache_dir) on another disk; re-running the same command resumes where it stopped")


if __name__ == "__main__":
    sys.exit(command_line())
