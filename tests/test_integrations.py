"""The framework callbacks, each with a tiny model: a fit logged into the store by the framework's
own schedules (metrics every logging step, checkpoints at every save)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dlstore
from dlstore.store.maintenance import verify


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long()


def _steps(store, table, metric=None):
    where = f" WHERE metric = '{metric}'" if metric else ""
    return store.sql(f"SELECT DISTINCT step FROM {table}{where} ORDER BY step")["step"].to_list()


def test_a_lightning_fit_is_logged_with_its_checkpoints(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from dlstore.integrations.lightning import DlstoreCallback

    class Tiny(pl.LightningModule):
        def __init__(self, lr: float = 0.1, width: int = 4):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    store = dlstore.open(tmp_path / "s", create=True)
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=10,
                                         save_top_k=-1)
    module = Tiny()
    trainer = pl.Trainer(max_steps=20, log_every_n_steps=5, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[every, DlstoreCallback(store, zoo="pl", config={"seed": 0})])
    trainer.fit(module, loader)
    row = store.sql("SELECT status, lr, width, seed FROM runs").to_dicts()
    assert row == [{"status": "complete", "lr": 0.1, "width": 4, "seed": 0}]
    # by global step after the optimizer step: the first batch ends at step 1
    assert _steps(store, "metrics", "train_loss") == [5, 10, 15, 20]
    assert _steps(store, "checkpoints") == [10, 20]
    run_id = store.sql("SELECT run_id FROM runs")["run_id"][0]
    last = store.load_state_dict(run_id, 20)
    assert all(torch.equal(last[k], v) for k, v in module.state_dict().items())
    assert verify(store).ok


def test_a_transformers_trainer_is_logged_with_its_checkpoints(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from dlstore.integrations.hf import DlstoreTrainerCallback

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    x, y = _data()
    rows = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    store = dlstore.open(tmp_path / "s", create=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=20, logging_steps=5, save_steps=10,
        per_device_train_batch_size=8, learning_rate=0.1, report_to=[], use_cpu=True,
        disable_tqdm=True)
    model = Tiny()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   callbacks=[DlstoreTrainerCallback(store, zoo="hf")])
    trainer.train()
    row = store.sql("SELECT status, json_extract(config, '$.training_args.learning_rate')::DOUBLE "
                    "AS lr FROM runs").to_dicts()
    assert row == [{"status": "complete", "lr": 0.1}]
    assert _steps(store, "metrics", "loss") == [5, 10, 15, 20]
    assert _steps(store, "checkpoints") == [10, 20]
    run_id = store.sql("SELECT run_id FROM runs")["run_id"][0]
    last = store.load_state_dict(run_id, 20)
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())
    assert verify(store).ok
