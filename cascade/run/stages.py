"""The stage loop of a run as plain functions: what each stage needs (skip, hand over only, or train),
the training of one stage from its instantiated parts, the loop over the stages and the evaluation
after the last. `cascade.fit` parses the settings and instantiates each stage's classes; everything
else happens here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.gain_router import GainRouter
from callbacks.preemption import PreemptionCheckpoint
from callbacks.provenance import ProvenanceStamp
from callbacks.stage_handover import StageHandover
from callbacks.stream_monitor import StreamMonitor
from callbacks.timing import TrainingTimer
from cascade.llm import LLM
from cascade.model.hf_models import max_positions
from cascade.run.evaluation import evaluate_run
from cascade.run.lock import RunHold, check_run_directory
from cascade.run.provenance import changes, refusal, stage_fingerprint
from cascade.run.stage_inputs import resume_checkpoint, stage_data
from cascade.run.stage_runner import (check_trainer_settings, evaluation_trainer, record_stage, remove_interrupted_writes,
                                      stage_trainer_settings)
from cascade.run.state import (checkpoint_problem, check_stage_selection, read_done, saved_tokenizer_problem, stage_dir,
                               stage_problem, trained_without_handover)
from cascade.training.warm_start import identity_start
from datamodules.corpus import check_eval_files
from datamodules.stream import StreamDataModule
from datamodules.text import TextDataModule
from datamodules.tokens import load_tokenizer
from lightning_modules.stage import StageModule

Plan = Literal["skip", "handover_only", "retrain", "train"]


class RunStopped(RuntimeError):
    """The run stopped before it finished, on a signal: `exit_code` is the shell's 128 + the signal's number."""

    exit_code = 143  # SIGTERM


def run_directory(runs_dir: str | os.PathLike, name: str) -> Path:
    return Path(runs_dir) / name  # where a run writes everything


@dataclass(frozen=True)
class RunSettings:
    """The run's own settings (the command's top-level arguments, declared with their defaults in `cascade.fit`)."""

    name: str
    runs_dir: str
    num_stages: int
    stage: int | None  # the one stage to train; None: every stage in turn
    ckpt_path: str | None  # where the first stage trained resumes from (the CLI reads "last" as None, the default)
    eval_batch_size: int | None
    eval_files: list[str] | None
    eval_curve: bool
    eval_routing_bound: bool

    @property
    def run_dir(self) -> Path:
        return run_directory(self.runs_dir, self.name)

    @property
    def stages(self) -> list[int]:
        return list(range(self.num_stages)) if self.stage is None else [self.stage]


@dataclass
class StageParts:
    """Stage k's objects, instantiated from the run's settings for that stage (its index, directories and seed)."""

    model: StageModule
    data: TextDataModule  # the run's corpus: stage 0 trains on it, stage k > 0 on the hand-over batched as it is
    handover: StageHandover
    trainer: Mapping  # Lightning `Trainer` arguments
    callbacks: list[Callback]  # the stage's own besides its timer and hand-over (a checkpoint, a config saver)
    router: GainRouter | None = None  # the rounds of a streamed stage k > 0


def hands_over(k: int, num_stages: int, after_last_stage: bool) -> bool:
    """Every stage but the last hands its hard tokens to the next; the last one only if asked."""
    return k < num_stages - 1 or after_last_stage


def plan_stage(k: int, stage_path: Path, hands_over: bool, ckpt_path: str | None, fingerprint: dict) -> Plan:
    """What stage k needs, said on rank zero: "skip" (complete, its files checked against their checksums),
    "handover_only" (trained as the last stage of an earlier run: its saved LLM only hands over), "retrain" (trained
    after another LLM k-1 than the one there now: from the start) or "train" (from `ckpt_path`, else from its newest
    complete checkpoint, else from the start). `fingerprint`: what defines the stage now (`cascade.run.provenance`);
    a complete stage recorded with other settings or data is refused (ValueError saying what differs)."""
    problem = stage_problem(stage_path, hands_over) if ckpt_path is None else "resuming from --ckpt_path"
    handover_only = problem is not None and ckpt_path is None and trained_without_handover(stage_path)
    if problem is None or handover_only:
        done = read_done(stage_path)
        differences, after_other = changes(done.get("fingerprint") or {"settings": done.get("settings"),
                                                                      "after": fingerprint["after"]}, fingerprint)
        if after_other:
            rank_zero_info(f"stage {k} was trained after another LLM {k - 1} than the one there now: training it again "
                           "from the start")
            return "retrain"
        if differences:
            raise ValueError(refusal(k, f"model in {stage_path}", differences))
    if problem is None:
        rank_zero_info(f"stage {k}: complete in {stage_path} (checked against its checksums), skipped")
        return "skip"
    if handover_only:
        rank_zero_info(f"stage {k}: trained as the last stage of an earlier run; handing its tokens over to stage {k + 1}")
        return "handover_only"
    if (stage_path / "done.json").exists() and ckpt_path is None:  # a record there, whole or not: say why it is not kept
        rank_zero_info(f"stage {k} was complete, but {problem}: training it again")
    return "train"


def train_stage(run_dir: Path, k: int, parts: StageParts, *, hands_over: bool, handover_only: bool,
                ckpt_path: str | None, fingerprint: dict, hold: Callable[[], None], fresh: bool = False) -> Trainer:
    """Train stage k with its fresh `parts` under a fresh Trainer (resuming from `ckpt_path` or its
    newest checkpoint recorded with the same `fingerprint`; with `fresh`, from the start, its old
    checkpoints removed), hand its hard tokens over if it `hands_over`, save its LLM and mark it
    done with the `fingerprint` that defines it (checkpoints carry it too); `handover_only`: its
    saved LLM (loaded by `parts.model`) trains no step and only hands over. `hold` takes the run
    directory before the first write. Returns the stage's Trainer."""
    model, text, handover = parts.model, parts.data, parts.handover
    limit = max_positions(model.llm.config)
    if limit is not None and text.seq_len > limit:
        raise ValueError(f"data.seq_len {text.seq_len} exceeds the model's {limit} positions; lower it or enlarge the model")
    router = parts.router if k > 0 and not handover_only else None
    joint = router is not None and router.objective == "mixture"
    datamodule = stage_data(run_dir, k, text, model.hparams.compile, joint, handover_only)
    if k > 0 and model.hparams.warm_start and not handover_only:  # a resumed stage's checkpoint then overwrites it
        identity_start(model.llm, LLM.from_pretrained(stage_dir(run_dir, k - 1) / "llm"))
        rank_zero_info(f"stage {k}: LLM {k} starts predicting exactly what LLM {k - 1} does (warm_start)")
    timer, preemption = TrainingTimer(), PreemptionCheckpoint(stage_dir(run_dir, k) / "checkpoints")
    monitor = [StreamMonitor()] if isinstance(datamodule, StreamDataModule) else []
    # the router before the checkpoint, which saves the new routing
    callbacks = [timer, preemption, ProvenanceStamp(fingerprint), *monitor, *([router] if router else []),
                 *([handover] if hands_over else []), *parts.callbacks]
    trainer_settings = stage_trainer_settings(parts.trainer, run_dir, k, callbacks)
    trainer = Trainer(**trainer_settings)  # refuses an accelerator this machine lacks, before anything is written
    hold()  # every setting is checked; from here on the run writes
    if trainer.is_global_zero:
        remove_interrupted_writes(run_dir)
    ckpt_path = resume_checkpoint(trainer, stage_dir(run_dir, k) / "checkpoints", k, ckpt_path, handover_only,
                                  fingerprint, fresh)
    more = f" and {trainer.world_size - 1} more devices" if trainer.world_size > 1 else ""
    rank_zero_info(f"stage {k}: {'handing over' if handover_only else 'training'} on {trainer.strategy.root_device}"
                   f"{more}, precision {trainer.precision}")
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        saved = f", after writing {preemption.saved}" if preemption.saved else ""
        raise RunStopped(f"stage {k} stopped at step {trainer.global_step} on SIGTERM{saved}; re-running the same "
                         "command resumes from its newest checkpoint") from None
    stream = None
    if isinstance(datamodule, StreamDataModule):
        stream = datamodule.stream_stats()
        datamodule.release()  # the frozen LLMs leave the GPU before the next stage loads its own
    record_stage(run_dir, k, trainer, model.llm, text, timer.stats, handover.stats if hands_over else None,
                 handover_only, fingerprint, stream, router)
    return trainer


def train_stages(run: RunSettings, build_stage: Callable[[int, bool], StageParts], *, after_last_stage: bool,
                 settings: dict, data: str, hold: Callable[[], None]) -> tuple[Trainer | None, TextDataModule | None]:
    """Train (or hand over from) each of the run's stages that is not complete, stage k's parts from
    `build_stage(k, handover_only)`; `settings` and `data` (the token cache's name) define each stage with the LLM
    before it (`stage_fingerprint`). Returns the last stage's Trainer and stage 0's data module, None where none ran."""
    ckpt_path, trainer, text = run.ckpt_path, None, None
    for k in run.stages:
        stage_path, hands_over_k = stage_dir(run.run_dir, k), hands_over(k, run.num_stages, after_last_stage)
        fingerprint = stage_fingerprint(run.run_dir, k, settings, data)  # after LLM k-1 as it is now
        plan = plan_stage(k, stage_path, hands_over_k, ckpt_path, fingerprint)
        if plan == "skip":
            continue
        handover_only = plan == "handover_only"
        parts = build_stage(k, handover_only)
        if k == 0:
            text = parts.data
        trainer = train_stage(run.run_dir, k, parts, hands_over=hands_over_k, handover_only=handover_only,
                              ckpt_path=None if handover_only else ckpt_path, fingerprint=fingerprint, hold=hold,
                              fresh=plan == "retrain")
        ckpt_path = None
    return trainer, text


def evaluate_cascade(run: RunSettings, text: TextDataModule, num_llms: int, trainer: Trainer, *, compile: bool | None,
                     exit_layer: int | None, routing_threshold: float | None) -> dict:
    """True early exit of the run's first `num_llms` LLMs (`cascade.run.evaluation`) on `trainer`'s device, in its
    precision; `compile`, `exit_layer` and `routing_threshold` are the run's model settings (`StageModule`'s)."""
    return evaluate_run(
        run.run_dir, text, num_llms, trainer.strategy.root_device, trainer.precision_plugin.forward_context,
        str(trainer.precision), batch_size=run.eval_batch_size or text.batch_size, files=run.eval_files,
        curve=run.eval_curve, routing_bound=run.eval_routing_bound, compile=compile, exit_layer=exit_layer,
        routing_threshold=routing_threshold,
    )


def run_cascade(run: RunSettings, build_stage: Callable[[int, bool], StageParts], *, after_last_stage: bool,
                settings: dict, data_settings: Mapping, trainer_settings: Mapping, compile: bool | None,
                exit_layer: int | None, routing_threshold: float | None) -> dict | None:
    """Train the stages not complete yet (`train_stages`), then evaluate the cascade on rank zero (None elsewhere).
    `data_settings`, `trainer_settings`: the run's `TextDataModule` and `Trainer` arguments, for the evaluation when
    stage 0 or every stage was complete already; the others as in `train_stages` and `evaluate_cascade`. The run
    directory is held from the first write until this returns."""
    hold = RunHold(run.run_dir)
    try:
        check_run_directory(run.runs_dir, run.name)
        if run.eval_batch_size is not None and run.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or null (the data's batch size), got {run.eval_batch_size}")
        check_stage_selection(run.run_dir, run.stage, run.num_stages)
        check_trainer_settings(trainer_settings)
        if run.ckpt_path is not None and (problem := checkpoint_problem(Path(run.ckpt_path))):
            raise ValueError(f"--ckpt_path: {problem}")
        if run.eval_files:  # before any training, not after it
            check_eval_files(run.eval_files, data_settings.get("text_column", "text"))
        corpus = TextDataModule(**data_settings)  # its token cache's name fingerprints the corpus and the tokenizer
        last, text = train_stages(run, build_stage, after_last_stage=after_last_stage, settings=settings,
                                  data=corpus.token_dir.name, hold=hold.take)
        if rank_zero_only.rank != 0:
            return None
        own = run.run_dir / "tokenizer"
        if text is None and own.is_dir() and saved_tokenizer_problem(run.run_dir, run.stages[-1] + 1) is None:
            corpus.tokenizer = load_tokenizer(str(own))  # the run's own: no BPE trained again
        text = text if text is not None else corpus  # the corpus the stages were trained on (their records checked)
        hold.take()
        remove_interrupted_writes(run.run_dir)  # also where no stage trained (a kill while eval.json was written)
        num_llms = run.stages[-1] + 1
        if problem := saved_tokenizer_problem(run.run_dir, num_llms):
            rank_zero_info(f"{problem}: saving the tokenizer again")  # nothing needs training again
            text.save_tokenizer(run.run_dir / "tokenizer")
        last = last if last is not None else evaluation_trainer(trainer_settings)
        return evaluate_cascade(run, text, num_llms, last, compile=compile, exit_layer=exit_layer,
                                routing_threshold=routing_threshold)
    finally:
        hold.release()
