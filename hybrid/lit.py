"""LightningModule: next-token loss on the task's scored positions, task metrics, optimizer."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from hybrid.data.base import IGNORE, Task
from hybrid.layers.route_metrics import routing_metrics
from hybrid.model import HybridLM
from hybrid.optim import OptimConfig, build_optimizer


class LitLM(L.LightningModule):
    def __init__(self, model: HybridLM, task: Task, optim: OptimConfig, total_steps: int):
        super().__init__()
        self.model, self.task, self.optim_cfg, self.total_steps = model, task, optim, total_steps

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch["inputs"], seq_idx=batch.get("seq_idx"))  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        return loss, logits

    def training_step(self, batch, batch_idx):
        # Advance the resumable stream here, not in on_train_batch_end: checkpoint callbacks save in
        # their own on_train_batch_end hooks, which run before the module's, so the saved position
        # would lag one batch behind the saved weights.
        stream = self.trainer.datamodule.train_stream if self.trainer.datamodule is not None else None
        if stream is not None and "batch_index" in batch:
            stream.mark_consumed(int(batch["batch_index"]))
        loss, logits = self._loss(batch)
        aux = self.model.aux_loss()
        total = loss if aux is None else loss + aux
        metrics = {"train/loss": loss, **{f"train/{k}": v for k, v in self.task.metrics(logits, batch).items() if k != "n_scored"}}
        if aux is not None:
            metrics["train/aux_loss"] = aux
        self.log_dict(metrics, prog_bar=True, on_step=True, on_epoch=False)
        route = routing_metrics(self.model, batch["labels"])  # per-layer router stats (empty without routers)
        if route:
            self.log_dict({f"train/{k}": v for k, v in route.items()}, on_step=True, on_epoch=False)
        return total

    def validation_step(self, batch, batch_idx):
        loss, logits = self._loss(batch)
        metrics = self.task.metrics(logits, batch)
        n = int(metrics.pop("n_scored").item())
        self.log("val/loss", loss, prog_bar=False, sync_dist=True, batch_size=max(n, 1))
        for k, v in metrics.items():
            self.log(f"val/{k}", v, prog_bar=True, sync_dist=True, batch_size=max(n, 1))
        route = routing_metrics(self.model, batch["labels"])
        if route:
            self.log_dict({f"val/{k}": v for k, v in route.items()}, sync_dist=True, batch_size=batch["labels"].shape[0])

    def configure_optimizers(self):
        opt, sched = build_optimizer(self.model, self.optim_cfg, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
