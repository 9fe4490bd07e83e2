"""StageModule: the training of one LLM of the cascade (stage k) as a LightningModule."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from cascade.training.deferral import Deferral
from cascade.training.layer_exits import layer_weighted_loss, scheduled_layer_weights
from cascade.routing.layer_skip import routed_nll
from cascade.llm import LLM
from cascade.training.losses import next_token_loss
from cascade.training.optim import adamw_warmup_cosine, clip_gradients
from cascade.sequence_data import Batch
from cascade.model.compile import apply_compile, compiles
from cascade.utils import rng_states, set_rng_states
from lightning_modules.stage_metrics import TrainingMonitor, ValidationMetrics
from lightning_modules.stage_settings import (build_llm, check_compile_mode, check_model_fits,
                                              check_model_settings, check_optimizer_settings, layer_settings)


class StageModule(LightningModule):
    """Next-token training of one LLM on its stage's tokens (ids at stage 0, hidden states after).

    Args:
        model: A transformers model type ("gpt2", "llama", "qwen2", ...), a hub model name, or a
            local directory saved with `save_pretrained`.
        model_config: Overrides of the model's config (e.g. {"n_layer": 2, "n_embd": 128}).
        pretrained: Load the weights of `model` (a name or directory) instead of a fresh init.
        vocab_size: Vocabulary size of a fresh model; linked from the data's tokenizer.
        exit_fn: Exit function by name: cosine, max_prob, top2_margin, neg_entropy, or learned (a
            small network fitted to the LLM's token loss at the hand-over,
            `cascade.model.exit_classifier`).
        warm_start: Each LLM hands over its residual stream before the final norm, and each LLM
            k > 0 starts as the identity on it with copies of LLM k-1's final norm and head: before
            training it predicts exactly what LLM k-1 does (`cascade.training.warm_start`; set up by
            `cascade.fit`, which reads LLM k-1).
        stage: Index k of this LLM in the cascade (set by `cascade.fit`).
        lr: Peak learning rate of stage 0.
        lr_decay: Stage k trains with peak learning rate `lr * lr_decay ** k`.
        weight_decay: AdamW weight decay of matrices (biases, norms and embeddings get none).
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps before the cosine decay.
        min_lr_ratio: The cosine decay ends at `min_lr_ratio` times the peak.
        layer_weights: Per-layer loss weights {layer: weight}, 1-indexed (last layer = L): the loss
            is the weighted sum of each layer's cross-entropy through the model's own final norm and
            LM head. Default {L: 1}, standard training; {1: 0.5, L: 0.5} is auxiliary-loss (DEED)
            training.
        layer_weights_end: The weights that `alpha_schedule` moves `layer_weights` to by the last
            step.
        alpha_schedule: How the layer weights move during training: constant, linear or cosine.
        exit_warmup_steps: Intermediate layers' weights ramp up linearly from 0 over these steps.
        layer_lr_scales: Learning-rate multipliers {layer: scale} (discriminative fine-tuning), with
            "embeddings" and "head" (final norm and an untied LM head) as keys of their own; 1
            elsewhere.
        exit_layer: A layer e < L after which confident tokens exit (true layer skipping):
            validation then reports the routed perplexity, exit fraction and compute fraction at
            `routing_threshold`.
        routing_threshold: A token exits at `exit_layer` iff its max softmax probability there is
            >= this.
        routed_loss: Token-routed training: tokens confident at `exit_layer` take their loss there,
            the others at the last layer, and layers after `exit_layer` run only on the others
            (replaces `layer_weights`).
        mod_capacity: Mixture-of-Depths: each routed layer processes this fraction of every
            sequence's tokens in training (a learned router's top-k; the others skip it through the
            residual) and, in evaluation, the tokens its router scores above 0.5 (causal). 1.0 is
            the plain model.
        mod_layers: The routed layers (1-indexed); default every other layer, 2, 4, ...
        mod_aux_weight: Weight of the routers' BCE loss that teaches them to predict their top-k
            (the causal routing used in evaluation).
        compile: Train with the HF model, LM head and loss under `torch.compile` (fused kernels, and
            the float32 logits are never written out); only when the last layer alone carries the
            loss. Default: on a GPU (on a CPU compiling costs more than it saves; `true` compiles
            there too). The hand-over's scoring pass after the stage (`StageHandover`) then runs the
            model compiled too.
        compile_mode: The `torch.compile` mode: default, reduce-overhead (CUDA graphs: the step's
            kernels are launched as one graph, for models too small to hide the CPU's launch cost)
            or max-autotune.
        pad_vocab_to_multiple_of: Pad the embedding and LM head of a model built here to a multiple
            of this many rows (GPT-2's 50,257 -> 50,304) for faster matrix products; padded rows are
            never predicted.
        attn_implementation: transformers' attention implementation of a model built here ("sdpa",
            "eager", ...); default SDPA where the family has it, else eager (Gemma 2).
        llm: An existing LLM to train (Python API); when given, the model arguments are unused.
    """

    def __init__(
        self,
        model: str = "gpt2",
        model_config: dict | None = None,
        pretrained: bool = False,
        vocab_size: int | None = None,
        exit_fn: str = "cosine",
        warm_start: bool = False,
        stage: int = 0,
        lr: float = 6e-4,
        lr_decay: float = 0.5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        layer_weights: dict[int, float] | None = None,
        layer_weights_end: dict[int, float] | None = None,
        alpha_schedule: str = "constant",
        exit_warmup_steps: int = 0,
        layer_lr_scales: dict[int | str, float] | None = None,
        exit_layer: int | None = None,
        routing_threshold: float | None = None,
        routed_loss: bool = False,
        mod_capacity: float | None = None,
        mod_layers: list[int] | None = None,
        mod_aux_weight: float = 0.1,
        compile: bool | None = None,
        compile_mode: str = "default",
        pad_vocab_to_multiple_of: int | None = 64,
        attn_implementation: str | None = None,
        llm: LLM | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["llm"])
        check_optimizer_settings(lr, lr_decay, weight_decay, betas, warmup_steps, min_lr_ratio)
        check_model_settings(exit_warmup_steps, mod_aux_weight, pad_vocab_to_multiple_of)
        if llm is None:
            llm = build_llm(
                model, model_config, pretrained, vocab_size, exit_fn, attn_implementation,
                pad_vocab_to_multiple_of,
            )
        llm.hands_over_residual = warm_start
        check_model_fits(llm, stage, vocab_size)
        self.layer_weights, self.layer_weights_end, self.layer_lr_scales = layer_settings(
            llm, layer_weights, layer_weights_end, alpha_schedule, layer_lr_scales, exit_layer,
            routing_threshold, routed_loss, mod_capacity, mod_layers,
        )
        check_compile_mode(compile_mode)
        if mod_capacity is not None:
            llm.enable_mod(mod_capacity, mod_layers)
        self.llm = llm
        self.val_metrics = ValidationMetrics()
        self.monitor = TrainingMonitor()
        self._compiled_loss = None  # set at fit start on a GPU when `compile`
        self.deferral: Deferral | None = None  # the joint objective's head, set by `GainRouter`

    @property
    def compiled(self) -> bool:
        """Whether this fit trains the model under `torch.compile` (set when the fit starts, see
        `compile`)."""
        return self._compiled_loss is not None

    @property
    def peak_lr(self) -> float:
        return self.hparams.lr * self.hparams.lr_decay**self.hparams.stage

    def current_layer_weights(self) -> dict[int, float]:
        """The layer weights at this step of training (fixed unless `alpha_schedule` moves them)."""
        warmup = self.hparams.exit_warmup_steps
        if self._trainer is None or (self.layer_weights_end is None and not warmup):
            return self.layer_weights
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return scheduled_layer_weights(
            self.layer_weights, self.layer_weights_end, self.hparams.alpha_schedule,
            self.global_step / total, self.llm.num_layers,
            min(1.0, self.global_step / warmup) if warmup else 1.0,
        )

    def loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Layer-weighted mean next-token cross-entropy over the batch's real tokens, and their
        count."""
        loss, _ = self.layer_losses(batch, self.current_layer_weights())
        return loss, batch.num_tokens

    def routed_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per real token: the routed NLL (exit layer for confident tokens, last layer for the
        others, with true layer skipping), the exit layer's NLL and whether the token exits."""
        exit_layer, threshold = self.hparams.exit_layer, self.hparams.routing_threshold
        nll_exit, confidence, (routed,) = routed_nll(self.llm, batch, exit_layer, [threshold])
        return routed, nll_exit, confidence >= self.hparams.routing_threshold

    def layer_losses(self, batch: Batch, weights: dict[int, float]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        input_type, position_ids = batch.input_type, batch.model_position_ids()
        segment_ids = batch.model_segment_ids()
        history = tuple(layer for layer in weights if layer != self.llm.num_layers)
        if self._compiled_loss is not None and self.training and not history:
            if self.hparams.compile_mode == "reduce-overhead":
                # the last step's graph outputs are no longer read
                torch.compiler.cudagraph_mark_step_begin()
            ce = self._compiled_loss(
                batch.inputs, input_type, position_ids, segment_ids, batch.targets
            ).clone()
            return weights[self.llm.num_layers] * ce, {self.llm.num_layers: ce}
        h_out, hidden_history = self.llm(batch.inputs, input_type, position_ids, segment_ids, history=history)
        return layer_weighted_loss(self.llm, hidden_history, h_out, batch.targets, weights)

    def _last_layer_loss(self, inputs, input_type, position_ids, segment_ids, targets) -> torch.Tensor:
        h_out, _ = self.llm(inputs, input_type, position_ids, segment_ids, history=())
        return next_token_loss(self.llm, h_out, targets)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # dropout draws from the global generators: a resumed run continues them where they were
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        set_rng_states(checkpoint.get("rng_states", {}))

    def on_fit_start(self) -> None:
        # HF's from_pretrained returns eval mode; pre-training wants dropout as configured
        self.llm.train()
        self.monitor.restart()
        if compiles(self.hparams.compile, self.device):
            # batches have one shape (fixed-length rows, the last batch padded), but
            # Mixture-of-Depths keeps a varying number of tokens per layer where rows are packed (it
            # uses no flex attention)
            dynamic = None if self.llm.mod is not None else False
            mode = self.hparams.compile_mode
            self._compiled_loss = apply_compile(self._last_layer_loss, mode=mode, dynamic=dynamic)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        metrics = {}  # logged on the logger's steps only, see below
        if self.deferral is not None:  # the joint objective (`cascade.training.deferral`)
            loss, metrics["train/defer_probability"] = self.deferral.loss(self.llm, batch)
        elif self.hparams.routed_loss:
            routed, _, exits = self.routed_losses(batch)
            loss = routed.mean()
            metrics["train/exit_fraction"] = exits.float().mean()
        else:
            weights = self.current_layer_weights()
            loss, per_layer = self.layer_losses(batch, weights)
            if len(weights) > 1 or self.layer_weights_end is not None:
                metrics.update(
                    {f"train/ce_layer_{layer}": ce.detach() for layer, ce in per_layer.items()}
                )
                metrics.update({f"train/layer_weight_{layer}": w for layer, w in weights.items()})
        if self.llm.mod is not None:
            aux = self.llm.mod.aux_loss()
            metrics["train/mod_aux_loss"] = aux.detach()
            loss = loss + self.hparams.mod_aux_weight * aux
        schedule = self.lr_schedulers() if self._trainer is not None else None
        lr = schedule.get_last_lr()[0] if schedule is not None else self.peak_lr
        self.monitor.check_finite(loss, self.global_step, self.hparams.stage, lr)
        self.monitor.tokens += batch.num_tokens
        # Only on the logger's steps: `self.log` costs CPU time, and reading a GPU value makes the
        # CPU wait for the GPU
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            lr = self.lr_schedulers().get_last_lr()[0]
            world_size = self.trainer.world_size
            progress_bar, others = self.monitor.logged(metrics, loss, self.llm.mod, lr, world_size)
            self.log_dict(progress_bar, prog_bar=True)
            self.log_dict(others)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # val/loss and val/ppl are the model's own output (last layer); weighted layers get
        # val/ce_layer_l
        last = self.llm.num_layers
        weighted = (*self.layer_weights, *(self.layer_weights_end or {}), last)
        layers = {layer: 1.0 for layer in weighted}
        if self.hparams.exit_layer is not None:
            layers[self.hparams.exit_layer] = 1.0
        _, per_layer = self.layer_losses(batch, layers)
        metrics, tokens = self.val_metrics, batch.num_tokens
        if tokens == 0:  # a streamed batch whose windows handed nothing on: run (every process runs alike), not counted
            return
        metrics.nll.update(per_layer[last], weight=tokens)
        if self.llm.mod is not None:  # eval mode: the causal routing
            metrics.mod_compute.update(self.llm.mod.compute_fraction(), weight=tokens)
        if len(per_layer) > 1:
            ce_layers = {f"val/ce_layer_{layer}": ce for layer, ce in per_layer.items()}
            self.log_dict(ce_layers, batch_size=tokens)
        if self.hparams.routing_threshold is not None:
            routed, _, exits = self.routed_losses(batch)
            metrics.routed_nll.update(routed.mean(), weight=tokens)
            metrics.exit_fraction.update(exits.float().mean(), weight=tokens)

    def on_validation_epoch_end(self) -> None:
        mod, routing = self.llm.mod is not None, self.hparams.routing_threshold is not None
        exit_layer, num_layers = self.hparams.exit_layer, self.llm.num_layers
        values = self.val_metrics.epoch_values(mod, routing, exit_layer, num_layers)
        self.log("val/loss", values.pop("val/loss"), prog_bar=True)
        for name, value in values.items():
            self.log(name, value)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses to clip for a fused optimizer under mixed precision because fp16 loss
        # scaling would leave the gradients scaled; bf16 and fp32 have no scaler, and fp16 gets no
        # fused AdamW.
        clip_gradients(self.parameters(), gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        hp = self.hparams
        fused = self.device.type == "cuda" and self.trainer.precision != "16-mixed"
        total = int(self.trainer.estimated_stepping_batches)
        others = self.deferral.parameters() if self.deferral is not None else ()
        return adamw_warmup_cosine(self.llm, self.peak_lr, self.layer_lr_scales, hp.weight_decay, hp.betas, fused,
                                   hp.warmup_steps, total, hp.min_lr_ratio, others)
