"""A PyTorch Lightning callback that logs a fit into a dlstore store.

    trainer = lightning.Trainer(callbacks=[DlstoreCallback(store, zoo="sweep")], ...)

The run's config is the module's hyperparameters (`save_hyperparameters`) plus `config`; its
metrics are the trainer's logged values (`self.log(...)` in the module) at every
`log_every_n_steps` and after each validation, by global step; a checkpoint is saved whenever the
trainer saves one (`ModelCheckpoint`'s schedule), by global step. The run is complete when the
fit ends and failed when it raises.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from dlstore.integrations import StepLog, json_config, scalars


class DlstoreCallback(pl.Callback):
    def __init__(self, store, zoo: str, config: dict[str, Any] | None = None,
                 run_id: str | None = None, resume: bool = False):
        self.store, self.zoo, self.extra = store, zoo, dict(config or {})
        self.run_id, self.resume = run_id, resume
        self.run = None
        self._steps: StepLog | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = json_config({**dict(getattr(pl_module, "hparams", {}) or {}), **self.extra})
        self.run = self.store.track(self.zoo, config, run_id=self.run_id, resume=self.resume)
        self._steps = StepLog(self.run)

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
