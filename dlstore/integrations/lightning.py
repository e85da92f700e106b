"""A PyTorch Lightning callback that logs a fit into a dlstore store.

    trainer = lightning.Trainer(callbacks=[DlstoreCallback(store, zoo="sweep")], ...)

The run's config is the module's hyperparameters (`save_hyperparameters`) plus `config`; its
metrics are the trainer's logged values (`self.log(...)` in the module) at every
`log_every_n_steps` and after each validation, by global step; a checkpoint is saved whenever the
trainer saves one (`ModelCheckpoint`'s schedule), by global step. The run is complete when the
fit ends and failed when it raises.
"""

from __future__ import annotations

import lightning.pytorch as pl

from dlstore.integrations import TrackingCallback, scalars


class DlstoreCallback(TrackingCallback, pl.Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(dict(getattr(pl_module, "hparams", {}) or {}))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._steps.log(trainer.global_step, scalars(trainer.callback_metrics))

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self._steps is not None and not trainer.sanity_checking:
            self._steps.log(trainer.global_step, scalars(trainer.callback_metrics))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        if self.run is not None:
            self.run.save(trainer.global_step, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.run is not None:
            self._steps.log(trainer.global_step, scalars(trainer.callback_metrics))
            self.run.close()

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if self.run is not None:
            self.run.close(exception)
