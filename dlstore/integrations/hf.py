"""A Hugging Face `transformers` TrainerCallback that logs a training run into a dlstore store.

    trainer = transformers.Trainer(..., callbacks=[DlstoreTrainerCallback(store, zoo="ft")])

The run's config is the TrainingArguments (and the model's config, when it has one) plus
`config`; its metrics are what the trainer logs (`logging_steps`, evaluations) by global step; a
checkpoint is saved at every save of the trainer (`save_steps` / `save_strategy`), by global
step. The run is complete when training ends; a run whose process dies shows as `died`.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from dlstore.integrations import StepLog, json_config, scalars


class DlstoreTrainerCallback(TrainerCallback):
    def __init__(self, store, zoo: str, config: dict[str, Any] | None = None,
                 run_id: str | None = None, resume: bool = False):
        self.store, self.zoo, self.extra = store, zoo, dict(config or {})
        self.run_id, self.resume = run_id, resume
        self.run = None
        self._steps: StepLog | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = {"training_args": args.to_dict()}
        if model is not None and hasattr(getattr(model, "config", None), "to_dict"):
            config["model_config"] = model.config.to_dict()
        config = json_config({**config, **self.extra})
        self.run = self.store.track(self.zoo, config, run_id=self.run_id, resume=self.resume)
        self._steps = StepLog(self.run)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._steps is not None and logs:
            self._steps.log(state.global_step, scalars(logs))

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.run is not None and model is not None:
            self.run.save(state.global_step, model)

    def on_train_end(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.close()
