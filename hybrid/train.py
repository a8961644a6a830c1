"""``hybrid-train``: train a model from a YAML layer pattern on a task (Hydra app).

    hybrid-train model=hybrid_1to3 data=mqar trainer.max_steps=2000
    hybrid-train -m model.pattern=AAAA,MMMA,MMMM                 # a sweep over architectures
    hybrid-train run_dir=logs/train/runs/<name> ckpt_path=last   # resume a run in place

Everything is validated (task, model, optimizer, trainer, checkpoint) before training starts, and
every run leaves ``record.json`` in its folder, also when it fails.
"""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from hybrid.callbacks import SeqLenWarmup, ThroughputMonitor
from hybrid.checkpoint import AtomicCheckpointIO, resolve_ckpt_path
from hybrid.data import build_task
from hybrid.data.datamodule import TaskDataModule
from hybrid.lit import LitLM
from hybrid.model import HybridLM, model_config
from hybrid.optim import OptimConfig
from hybrid.records import RunRecord
from hybrid.registry import ConfigError, build_dataclass

log = logging.getLogger("hybrid.train")

_TRAINER_OWNED = {"logger", "callbacks", "plugins", "default_root_dir", "enable_checkpointing"}


class FailAtStep(L.Callback):
    """Raises at a given step: for testing crash recovery and sweeps that survive a failing job."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"injected failure at step {trainer.global_step} (fail_at_step={self.step})")


class SaveLastOnEnd(L.Callback):
    """Writes ``last.ckpt`` when training ends between periodic saves, so a finished run's last
    checkpoint always holds its final weights (and ``ckpt_path=last`` with a larger ``max_steps``
    continues from there)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step == 0:
            return
        saved = {getattr(cb, "_last_global_step_saved", -1) for cb in trainer.checkpoint_callbacks}
        if trainer.global_step not in saved:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full training state, to resume from


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def trainer_kwargs(cfg: dict) -> dict:
    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"} - _TRAINER_OWNED
    bad = [k for k in cfg if k not in valid]
    if bad:
        raise ConfigError(f"trainer: unknown option(s) {', '.join(bad)}. Valid Lightning Trainer options: "
                          f"{', '.join(sorted(valid))}")
    return dict(cfg)


def build_loggers(cfg: dict, run_dir: Path, name: str, summary: dict, tags: list[str]) -> list:
    loggers = []
    unknown = set(cfg) - {"wandb", "csv"}
    if unknown:
        raise ConfigError(f"logger: unknown logger(s) {', '.join(sorted(unknown))}. Valid: wandb, csv")
    if cfg.get("csv") is not None:
        loggers.append(L.pytorch.loggers.CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    wb = cfg.get("wandb")
    if wb is not None:
        loggers.append(_wandb_logger(dict(wb), run_dir, name, summary, tags))
    return loggers


def _wandb_logger(wb: dict, run_dir: Path, name: str, summary: dict, tags: list[str]):
    from lightning.pytorch.loggers import WandbLogger

    mode = wb.pop("mode", "offline")
    if mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.wandb.mode must be offline, online or disabled, got {mode!r}")
    # The run id lives in the run folder, so `ckpt_path=last` continues the same W&B run.
    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # any short lowercase id is a valid W&B run id
        id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    all_tags = sorted({*tags, *wb.pop("tags", []), summary["family"], "pure" if summary["is_pure"] else "hybrid",
                       f"pattern:{summary['pattern_hash']}"})
    return WandbLogger(name=name, save_dir=str(run_dir), id=run_id, resume="allow", mode=mode,
                       project=wb.pop("project", "hybrid"), entity=wb.pop("entity", None),
                       group=wb.pop("group", None), tags=all_tags, job_type=wb.pop("job_type", "train"), **wb)


def build_callbacks(cfg: dict, run_dir: Path, fail_at_step: int | None = None,
                    progress_bar: bool = True) -> list[L.Callback]:
    known = {"checkpoint", "lr_monitor", "throughput", "seq_len_warmup", "early_stopping", "progress_bar"}
    unknown = set(cfg) - known
    if unknown:
        raise ConfigError(f"callbacks: unknown callback(s) {', '.join(sorted(unknown))}. Valid: {', '.join(sorted(known))}")
    cbs: list[L.Callback] = []
    ck = cfg.get("checkpoint")
    if ck is not None:
        cbs.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="best",
                                                       save_last=True, enable_version_counter=False, **ck))
        cbs.append(SaveLastOnEnd(run_dir / "checkpoints" / "last.ckpt"))
    if cfg.get("lr_monitor"):
        cbs.append(L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"))
    if cfg.get("throughput") is not None:
        cbs.append(ThroughputMonitor(**cfg["throughput"]))
    if cfg.get("seq_len_warmup") is not None:
        cbs.append(SeqLenWarmup(**cfg["seq_len_warmup"]))
    if cfg.get("early_stopping") is not None:
        cbs.append(L.pytorch.callbacks.EarlyStopping(**cfg["early_stopping"]))
    if cfg.get("progress_bar") is not None and progress_bar:
        cbs.append(L.pytorch.callbacks.TQDMProgressBar(**cfg["progress_bar"]))
    if fail_at_step is not None:
        cbs.append(FailAtStep(int(fail_at_step)))
    return cbs


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Train one run into ``run_dir``; returns its final metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_dir)
    config = plain(cfg)
    record.update(status="running", config=config, error=None)
    try:
        return _train(config, run_dir, record)
    except BaseException as exc:
        record.fail(exc)
        raise
    finally:
        _finish_wandb()


def _train(config: dict, run_dir: Path, record: RunRecord) -> dict[str, float]:
    # --- validate everything before building anything expensive
    task = build_task(config["data"])
    mcfg = model_config(config["model"])
    if mcfg.vocab_size < task.vocab_size:
        raise ConfigError(f"model vocab_size {mcfg.vocab_size} is smaller than the task's vocabulary ({task.vocab_size})")
    optim = build_dataclass(OptimConfig, dict(config.get("optim") or {}), "optim")
    tkw = trainer_kwargs(config.get("trainer") or {})
    ckpt = resolve_ckpt_path(config.get("ckpt_path"), run_dir)
    callbacks = build_callbacks(config.get("callbacks") or {}, run_dir, config.get("fail_at_step"),
                                progress_bar=tkw.get("enable_progress_bar", True))
    if config["batch_size"] < 1:
        raise ConfigError(f"batch_size must be >= 1, got {config['batch_size']}")
    max_steps = int(tkw.get("max_steps", -1))
    if max_steps <= 0:
        raise ConfigError("trainer.max_steps must be set (> 0): training streams are endless")

    L.seed_everything(config.get("seed", 0), workers=True, verbose=False)
    model = HybridLM(mcfg)
    dtype_bytes = 2 if "16" in str(tkw.get("precision", "32")) else 4
    summary = model.pattern.summary(mcfg.d_model, dtype_bytes=dtype_bytes)
    n_params = model.num_params()
    record.update(pattern=summary, n_params=n_params, run_name=config.get("run_name"))
    data_info = task.describe()  # e.g. the corpus SHA-256: results compare only on the same data
    if data_info:
        record.update(data_info=data_info)
    log.info("model %s (%s, hash %s): %.3fM parameters", summary["canonical"], summary["family"],
             summary["pattern_hash"], n_params / 1e6)

    loggers = build_loggers(config.get("logger") or {}, run_dir, config.get("run_name") or run_dir.name, summary,
                            list(config.get("tags") or []))
    for lg in loggers:
        lg.log_hyperparams({**config, "pattern": summary, "n_params": n_params, "data_info": data_info})
    wb = next((lg for lg in loggers if type(lg).__name__ == "WandbLogger"), None)
    if wb is not None:
        record.update(wandb={"id": wb.version, "dir": str(Path(wb.experiment.dir).parent)})

    dm = TaskDataModule(task, config["batch_size"], config.get("eval_batch_size"), config.get("num_workers", 0))
    lit = LitLM(model, task, optim, total_steps=max_steps)
    trainer = L.Trainer(**tkw, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                        default_root_dir=str(run_dir), enable_checkpointing=any(
                            isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks))
    trainer.fit(lit, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for cb in callbacks:
        if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint) and cb.best_model_score is not None:
            metrics[f"best/{cb.monitor}"] = float(cb.best_model_score)
    metrics["global_step"] = float(trainer.global_step)
    if wb is not None:  # final and best metrics in the W&B summary, so workspace panels can use them directly
        wb.experiment.summary.update({k: v for k, v in metrics.items() if k.startswith("best/")})
    record.finish(metrics)
    return metrics


def _finish_wandb() -> None:
    # One W&B run per job: without this, every job of a multirun logs into the first job's run.
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


@hydra.main(version_base="1.3", config_path="pkg://hybrid.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = train(cfg, run_dir)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        if HydraConfig.get().mode.name == "MULTIRUN":
            return None  # recorded as failed; the sweep goes on
        raise SystemExit(2) from exc
    except Exception:
        log.exception("run failed (recorded in %s)", run_dir / "record.json")
        if HydraConfig.get().mode.name == "MULTIRUN":
            return None
        raise
    objective = cfg.get("objective")
    return metrics.get(objective) if objective else None


def main() -> None:
    if any(a in ("--list-layers", "--layers") for a in sys.argv[1:]):
        from hybrid.cli import print_layers

        print_layers()
        return
    torch.set_float32_matmul_precision("high")
    _hydra_main()


if __name__ == "__main__":
    main()
