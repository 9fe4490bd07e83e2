"""Train a cascade stage by stage: `python -m cascade.fit --config configs/stage.yaml`.

Every `--trainer.*`, `--model.*` (StageModule), `--data.*` (TextDataModule) and `--handover.*` (StageHandover)
setting can be given in the YAML or overridden on the command line. A run writes everything under
`<runs_dir>/<name>/`: per stage `stage_k/` with TensorBoard logs, checkpoints, the model in Hugging Face format
(`llm/`, threshold in its config.json) and the hard tokens handed to the next stage (`handover/`); at the end the
ensemble is evaluated with true early exit on the validation split and the table is written to `eval.json` (with
`--model.exit_layer`, also each layer's exit perplexity and a threshold sweep of LLM 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from cascade.run.checkpoint_io import remove_partial_checkpoints
from callbacks.stage_handover import StageHandover
from callbacks.timing import TrainingTimer
from cascade.model.hf_models import max_positions
from cascade.llm import LLM
from cascade.run.evaluation import evaluate_run
from cascade.run.state import (RunDirectoryInUse, RunLock, changed_settings, check_stage_selection, latest_checkpoint,
                                read_done, saved_tokenizer_problem, stage_dir, stage_problem, stage_settings,
                                trained_without_handover)
from cascade.training.warm_start import identity_start
from datamodules.corpus import check_corpus_file
from datamodules.text import TextDataModule
from lightning_modules.stage import StageModule
from cascade.run.stage_runner import TRAINER_DEFAULTS, evaluation_trainer, record_stage, stage_trainer_settings


RUNNER_OWNED = {  # a stage's index and directories, which each stage gets from the run: what to give instead
    "--model.stage": "--stage (the stage to train alone)",
    "--handover.output_dir": "--runs_dir and --name (the run writes under <runs_dir>/<name>/stage_k/)",
    "--checkpoint.dirpath": "--runs_dir and --name (the run writes under <runs_dir>/<name>/stage_k/)",
    "--trainer.default_root_dir": "--runs_dir and --name (the run writes under <runs_dir>/<name>/stage_k/)",
}


def first_stage(stage: int | None) -> int:
    return stage or 0  # the first stage a run trains: --stage, else 0


def run_directory(runs_dir: str, name: str) -> str:
    return str(Path(runs_dir) / name)  # where a run writes everything


def trained_settings(c) -> dict:
    """What defines a trained stage among a run's settings `c` (recorded in its `done.json`)."""
    trainer = {k: c.trainer[k] for k in ("max_steps", "max_epochs", "accumulate_grad_batches", "gradient_clip_val")}
    return stage_settings({"model": c.model.as_dict(), "data": c.data.as_dict(), "handover": c.handover.as_dict(),
                           "trainer": trainer, "": {"seed_everything": c.seed_everything}})


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
            save_config_callback=None,  # each stage saves its own resolved config, see `stage_trainer`
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
            help="Checkpoint to resume the first stage trained from ('last' or a path). By default an unfinished "
            "stage resumes from its newest checkpoint and finished stages are skipped.",
        )
        parser.add_argument("--debug", type=bool, default=False, help="On an error, show its traceback, not only its message.")
        parser.add_class_arguments(StageHandover, "handover")  # a callback of the stages that hand over (not the last)
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
        """Nothing here: every stage instantiates its own model, data and Trainer in `fit_stage`."""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.runs_dir) / self.config.name

    def hands_over(self, k: int) -> bool:
        """Every stage but the last hands its hard tokens to the next; the last one only if asked."""
        return k < self.config.num_stages - 1 or self.config.handover.after_last_stage

    def run(self) -> dict | None:
        """Train the stages not complete yet, then evaluate; the run directory is held until this returns."""
        try:
            return self._run()
        finally:
            if getattr(self, "_lock", None) is not None:
                self._lock.release()
                self._lock = None

    def _run(self) -> dict | None:
        config = self.config
        check_stage_selection(self.run_dir, config.stage, config.num_stages)
        for f in config.eval_files or []:  # before any training, not after it
            check_corpus_file(Path(f).expanduser(), "eval_files", read=False)
        stages = range(config.num_stages) if config.stage is None else [config.stage]
        ckpt_path, settings = config.ckpt_path, trained_settings(config)
        for k in stages:
            path = stage_dir(self.run_dir, k)
            problem = stage_problem(path, self.hands_over(k)) if ckpt_path is None else "resuming from --ckpt_path"
            hand_over_only = problem is not None and ckpt_path is None and trained_without_handover(path)
            if (problem is None or hand_over_only) and (changed := changed_settings(path, settings)):
                rank_zero_info(f"stage {k} was trained with other settings ({changed}): kept as trained; to train with "
                               "these, give the run a new --name")
            if problem is None:
                rank_zero_info(f"stage {k}: complete in {path} (checked against its checksums), skipped")
                continue
            if hand_over_only:
                rank_zero_info(f"stage {k}: trained as the last stage of an earlier run; handing its tokens over to stage {k + 1}")
                self.fit_stage(k, None, trained=True)
            else:
                if read_done(path) is not None and ckpt_path is None:
                    rank_zero_info(f"stage {k} was complete, but {problem}: training it again")
                self.fit_stage(k, ckpt_path)
            ckpt_path = None
        if rank_zero_only.rank != 0:
            return None
        text = getattr(self, "text", None) or TextDataModule(**config.data.as_dict())  # stage 0's, where it ran
        self.hold_run_dir()
        if problem := saved_tokenizer_problem(self.run_dir, num_llms=stages[-1] + 1):
            rank_zero_info(f"{problem}: saving the tokenizer again")  # nothing needs training again
            text.save_tokenizer(self.run_dir / "tokenizer")
        return self.evaluate(text, num_llms=stages[-1] + 1)

    def hold_run_dir(self) -> None:
        """Take the run directory's lock before the first write (the run's first process: the others are its own)."""
        if getattr(self, "_lock", None) is None and rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
            self._lock = RunLock(self.run_dir)
            if self._lock.previous:
                rank_zero_info(f"{self.run_dir}: taking over from an earlier run that ended ({self._lock.previous})")

    def fit_stage(self, k: int, ckpt_path: str | None, trained: bool = False) -> None:
        """Train stage k with a fresh model, data and Trainer (resuming from `ckpt_path` or its newest checkpoint), hand
        its hard tokens over unless it is last, save its LLM and mark it done; `trained`: its saved LLM only hands over."""
        config = self.stage_config(k, trained)
        self.config_init = self.parser.instantiate(config)
        text, model, handover = self.config_init.data, self.config_init.model, self.config_init.handover
        limit = max_positions(model.llm.config)
        if limit is not None and text.seq_len > limit:
            raise ValueError(f"data.seq_len {text.seq_len} exceeds the model's {limit} positions; lower it or enlarge the model")
        datamodule = self.stage_datamodule(k, text)
        if k > 0 and model.hparams.warm_start and not trained:  # a resumed stage's checkpoint then overwrites it
            identity_start(model.llm, LLM.from_pretrained(stage_dir(self.run_dir, k - 1) / "llm"))
            rank_zero_info(f"stage {k}: LLM {k} starts predicting exactly what LLM {k - 1} does (warm_start)")
        timer = TrainingTimer()
        self.trainer = self.stage_trainer(k, config, [timer, *([handover] if self.hands_over(k) else [])], trained)
        ckpt_path = self.resume_checkpoint(k, ckpt_path, trained)
        processes = self.trainer.world_size
        rank_zero_info(f"stage {k}: {'handing over' if trained else 'training'} on {self.trainer.strategy.root_device}"
                       f"{f' and {processes - 1} more devices' if processes > 1 else ''}, precision {self.trainer.precision}")
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        record_stage(self.run_dir, k, self.trainer, model.llm, text, timer.stats, handover.stats if self.hands_over(k) else None,
                     trained, trained_settings(self.config))

    def stage_config(self, k: int, trained: bool):
        """The run's settings for stage k: its index, where its hand-over and checkpoints go, and (`trained`) its
        saved LLM loaded to hand over without training; seeds the stage."""
        stage_path = stage_dir(self.run_dir, k)
        config = self.config.clone()
        config.model.stage = k
        config.handover.output_dir = str(stage_path / "handover")
        config.checkpoint.dirpath = str(stage_path / "checkpoints")
        if trained:
            config.model.model, config.model.pretrained, config.model.model_config = str(stage_path / "llm"), True, None
            config.trainer.max_steps = 0
        if isinstance(config.seed_everything, int) and not isinstance(config.seed_everything, bool):
            # the stage's initialisation and dropout depend on the run's seed and k alone, not on earlier stages
            seed_everything(config.seed_everything + k, workers=True, verbose=False)
        return config

    def stage_datamodule(self, k: int, text: TextDataModule):
        """Stage 0 reads the corpus (tokenized, or its cache checked, before anything is written); stage k > 0 the
        hand-over of stage k - 1, with its own shuffle seed (its data order does not depend on stage 0's)."""
        if k > 0:
            return text.handover_data(stage_dir(self.run_dir, k - 1) / "handover", k)
        text.prepare_data()
        self.text = text
        return text

    def stage_trainer(self, k: int, config, callbacks: list, trained: bool) -> Trainer:
        """The stage's Trainer from the run's trainer settings (`cascade.run.stage_runner`); it saves the stage's
        resolved `config` to its log directory (not a hand-over alone: it keeps the training's)."""
        if not trained:
            callbacks = [*callbacks, SaveConfigCallback(self.parser, config, overwrite=True)]
        settings = stage_trainer_settings(self.config_init.trainer, self.run_dir, k, callbacks)
        self.hold_run_dir()  # every setting is checked; from here on the run writes
        return self.instantiate_trainer(**settings)

    def resume_checkpoint(self, k: int, ckpt_path: str | None, trained: bool) -> str | None:
        """`ckpt_path`, else the stage's newest complete checkpoint (partial ones of a killed write removed first)."""
        checkpoints = stage_dir(self.run_dir, k) / "checkpoints"
        if self.trainer.is_global_zero:
            for partial in remove_partial_checkpoints(checkpoints):
                rank_zero_info(f"stage {k}: removed {partial}, a checkpoint whose writing was cut short")
        if not trained and ckpt_path is None:
            if (resume := latest_checkpoint(checkpoints, warn=rank_zero_info)) is not None:
                rank_zero_info(f"stage {k}: resuming from {resume}")
                return str(resume)
        return ckpt_path

    def evaluate(self, text: TextDataModule, num_llms: int) -> dict:
        """True early exit of the trained ensemble (`cascade.run.evaluation`), on the last stage's device and in its
        precision, or with a Trainer of the run's settings when every stage was complete."""
        c = self.config
        trainer = getattr(self, "trainer", None) or evaluation_trainer(c.trainer)
        return evaluate_run(
            self.run_dir, text, num_llms, trainer.strategy.root_device, trainer.precision_plugin.forward_context,
            str(trainer.precision), batch_size=c.eval_batch_size or text.batch_size, files=c.eval_files,
            curve=c.eval_curve, routing_bound=c.eval_routing_bound, compile=c.model.compile, exit_layer=c.model.exit_layer,
            routing_threshold=c.model.routing_threshold,
        )


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, RunDirectoryInUse)  # what settings and data cause


def main(args=None) -> dict | None:
    return CascadeCLI(args).run()


def command_line() -> int:
    """`python -m cascade.fit`: an error that the settings or the data cause is one line on stderr (exit status 1);
    its traceback only with `--debug true`."""
    cli = CascadeCLI()
    try:
        cli.run()
    except USER_ERRORS as e:
        if cli.config.debug:
            raise
        print(f"error: {e}\n(run again with --debug true for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(command_line())
