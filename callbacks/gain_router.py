"""GainRouter: how a streamed stage k > 0 chooses the tokens that reach it, as it trains: in rounds, re-routing LLM
k-1 by LLM k's gain between them, or by a deferral head trained jointly with LLM k."""

from __future__ import annotations

import math
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from cascade.ensemble import routing_state, set_routing
from cascade.llm import LLM
from cascade.model.forward_settings import ForwardSettings
from cascade.exit_fn import learned_exit_fn
from cascade.routing.learned_exit import route_by_gain
from cascade.routing.stream import calibrate_streamed
from cascade.routing.threshold import check_hard_ratio
from cascade.training.deferral import Deferral
from callbacks.stage_handover import CALIBRATION_TOKENS
from callbacks.trainer_support import strategy_reduce


OBJECTIVES = ("next_token", "mixture")


class GainRouter(Callback):
    """Trains a streamed stage k > 0 in `rounds` rounds of equal steps. After each round but the last, LLM k-1 is
    routed by a gain router: its exit classifier fitted to LLM k's gain over LLM k-1 (LLM k as it is at that step)
    on tokens of the validation split, which neither LLM trains on, and calibrated to hand on `hard_ratio` of the
    training tokens reaching LLM k-1, as its own exit function was (`cascade.routing.learned_exit.route_by_gain`).
    LLM k then goes on, from its weights and its optimizer's state, on the tokens that router hands on: what waits in
    the stream is dropped, so every batch drawn after the round is the new router's but one (Lightning has drawn one
    batch ahead by then; a stage resumed from the checkpoint of that very step draws it anew, by the new router). This
    is CITER's alternation of router and model (Zheng et al. 2025), which converges in two rounds. The router is
    fitted on the validation split: evaluate on other text (`--eval_files`).

    The router is in the stage's checkpoints, and once the stage is done in `stage_k/routing/` (LLM k-1's own files
    stay as stage k-1 saved them): the evaluation, `Ensemble.from_pretrained` and the stages after route LLM k-1 by it.
    `rounds: 1` (the default) trains on LLM k-1's own exit function throughout. Stage 0 has no LLM before it: there
    these settings do nothing.

    `objective: mixture` is the joint objective instead (Co-LLM, Shen et al. 2024; `cascade.training.deferral`): LLM k
    trains on every token reaching LLM k-1 by the likelihood of the token-level mixture of the two, with a deferral
    head on LLM k-1's output trained beside it; when training ends the head is LLM k-1's exit classifier, calibrated
    to hand on `hard_ratio`, saved and used as the gain router is. LLM k's steps then each see fewer windows.

    Args:
        rounds: Rounds of stage k > 0 (>= 1); rounds > 1 stream every hand-over (`--handover.mode` auto or stream).
        objective: `next_token` (LLM k's own loss on the tokens handed on) or `mixture` (the joint objective, one
            round; it too streams every hand-over).
        tokens: Tokens reaching LLM k-1 from the validation split that the router is fitted on (a tenth held out).
        hidden: Width of the router's (or deferral head's) hidden layer.
        steps: AdamW steps of the router's fit.
        hard_ratio: Fraction of the tokens reaching LLM k-1 that it hands on (the run's `--handover.hard_ratio`).
        calibration_tokens: Training tokens the threshold is calibrated on (the run's `--handover.calibration_tokens`).
    """

    def __init__(self, rounds: int = 1, objective: Literal["next_token", "mixture"] = "next_token",
                 tokens: int = 200_000, hidden: int = 128, steps: int = 500, hard_ratio: float = 0.3,
                 calibration_tokens: int | None = CALIBRATION_TOKENS):
        if rounds < 1:
            raise ValueError(f"router.rounds must be >= 1, got {rounds}")
        if objective not in OBJECTIVES:
            raise ValueError(f"router.objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "mixture" and rounds > 1:
            raise ValueError("router.objective mixture trains its deferral head with LLM k throughout: give "
                             "router.rounds 1")
        for name, value in (("tokens", tokens), ("hidden", hidden), ("steps", steps)):
            if value < 1:
                raise ValueError(f"router.{name} must be >= 1, got {value}")
        check_hard_ratio(hard_ratio)
        self.rounds, self.objective, self.tokens, self.hidden, self.steps = rounds, objective, tokens, hidden, steps
        self.hard_ratio, self.calibration_tokens = hard_ratio, calibration_tokens
        self.done = 0  # rounds ended
        self.stats: list[dict] = []  # each re-routing's figures
        self.routed: LLM | None = None  # LLM k-1, once routed by a gain router
        self._restore: dict | None = None
        self._bounds: list[int] = []  # the steps after which a round ends, set when training starts

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        k, joint = pl_module.hparams.stage, self.objective == "mixture"
        if stage != "fit" or k == 0 or (self.rounds == 1 and not joint):
            return
        if not hasattr(trainer.datamodule, "frozen_llms"):
            what = f"router.rounds {self.rounds}" if not joint else "router.objective mixture"
            raise ValueError(f"{what} chooses stage {k}'s tokens as it trains, so they must be streamed through the "
                             "LLMs before it: give --handover.mode stream")
        if joint:
            pl_module.deferral = Deferral(trainer.datamodule.frozen_llms[-1], self.hard_ratio, self.hidden)

    def boundaries(self, trainer: Trainer) -> list[int]:
        """The steps after which a round ends."""
        total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        return [math.ceil(total * r / self.rounds) for r in range(1, self.rounds)]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bounds = self.boundaries(trainer) if pl_module.hparams.stage > 0 else []  # once, not every step
        if self._restore is not None:  # a resumed stage routes as it did when checkpointed
            previous = trainer.datamodule.frozen_llms[-1]
            set_routing(previous, self._restore)
            self.routed, self._restore = previous, None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.done < len(self._bounds) and trainer.global_step >= self._bounds[self.done]:
            self.reroute(trainer, pl_module)

    def reroute(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Route LLM k-1 by a gain router fitted to LLM k as it is now, and restart the stream's selection."""
        data, k = trainer.datamodule, pl_module.hparams.stage
        *before, previous = data.frozen_llms
        val = data.text.val_data
        reaching = data.expected_hard_fraction / self.hard_ratio  # of the tokens, those reaching LLM k-1
        windows = math.ceil(self.tokens / reaching / int(val.lengths.max()))
        fit_windows = val.select(torch.arange(min(val.num_sequences, windows)))
        settings, strategy = self.settings(trainer), trainer.strategy
        figures = route_by_gain(
            before, previous, pl_module.llm, fit_windows, data.train_windows, self.hard_ratio, data.batch_size,
            tokens=self.tokens, calibration_tokens=self.calibration_tokens, seed=data.seed + self.done,
            rank=trainer.global_rank, world_size=trainer.world_size, reduce=strategy_reduce(strategy),
            broadcast=lambda state: strategy.broadcast(state, src=0), hidden=self.hidden, steps=self.steps,
            settings=settings)
        data.drop_waiting()  # chosen by the old routing
        self.done, self.routed = self.done + 1, previous
        self.stats.append({"step": trainer.global_step, **figures})
        for logger in trainer.loggers:
            logger.log_metrics({f"router/{name}": v for name, v in figures.items() if isinstance(v, (int, float))},
                               step=trainer.global_step)
        rank_zero_info(f"stage {k}: round {self.done} of {self.rounds} ended at step {trainer.global_step}; LLM {k - 1} "
                       f"now routes by LLM {k}'s gain (held-out AUROC {figures['fit_held_out_auroc']:.3f}, threshold "
                       f"{figures['threshold']:.4g}, {figures['hard_fraction']:.1%} handed on)")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With the joint objective: LLM k-1's exit classifier becomes the deferral head, calibrated to `hard_ratio`."""
        if getattr(pl_module, "deferral", None) is None:
            return
        data, k = trainer.datamodule, pl_module.hparams.stage
        *before, previous = data.frozen_llms
        previous.exit_classifier, previous.exit_fn = pl_module.deferral.exit_classifier(), learned_exit_fn
        figures, _ = calibrate_streamed(
            before, previous, data.train_windows, self.hard_ratio, data.batch_size, tokens=self.calibration_tokens,
            seed=data.seed, rank=trainer.global_rank, world_size=trainer.world_size,
            reduce=strategy_reduce(trainer.strategy), settings=self.settings(trainer))
        self.routed = previous
        self.stats.append({"step": trainer.global_step, "objective": "mixture", **figures})
        rank_zero_info(f"stage {k}: LLM {k - 1} now routes by the deferral head trained with LLM {k} (threshold "
                       f"{figures['threshold']:.4g}, {figures['hard_fraction']:.1%} handed on)")

    def settings(self, trainer: Trainer) -> ForwardSettings:
        """How the frozen LLMs run here: rows of the windows' length, eager, in the Trainer's precision."""
        windows = trainer.datamodule.train_windows
        return ForwardSettings(int(windows.lengths.max()), False, trainer.precision_plugin.forward_context)

    def state_dict(self) -> dict:
        routing = routing_state(self.routed) if self.routed is not None else None
        return {"done": self.done, "stats": self.stats, "routing": routing}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done, self.stats, self._restore = state_dict["done"], state_dict["stats"], state_dict["routing"]

