"""StreamMonitor: the hard fraction a streamed stage actually receives, logged as it trains."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class StreamMonitor(Callback):
    """Logs `stream/hard_fraction` (of the windows' tokens this process's stream has read, those handed on to this
    stage: the product of the frozen LLMs' realized hard fractions) and `stream/passes` on the logger's steps, for a
    data module with `stream_stats` (`datamodules.stream.StreamDataModule`)."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        data = trainer.datamodule
        if not hasattr(data, "stream_stats") or (trainer.global_step % trainer.log_every_n_steps):
            return
        stats = data.stream_stats()
        if stats["hard_fraction"] is not None:
            pl_module.log("stream/hard_fraction", stats["hard_fraction"])
            pl_module.log("stream/passes", float(data.stream.pass_index + data.stream.position / max(1, data.stream.share().numel())))
