"""Lightning data module over any registered task: an endless, resumable training stream of
deterministic batches and the task's fixed test set."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from hybrid.data.base import Task


class _BatchIndexStream(IterableDataset):
    """Yields task batches start, start + 1, ...; worker w of W takes every W-th index so a
    multi-worker DataLoader (which reads workers round-robin) keeps the order."""

    def __init__(self, task: Task, batch_size: int, start: int):
        self.task, self.batch_size, self.start = task, batch_size, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in itertools.count(self.start + wid, nworkers):
            yield self.task.train_batch(index, self.batch_size)


class ResumableBatchStream:
    """The training iterable. Lightning stores ``state_dict()`` in checkpoints and calls
    ``load_state_dict()`` before iterating on resume. The position advances when a batch is
    *consumed* by a training step (``mark_consumed``), not when it is prefetched."""

    def __init__(self, task: Task, batch_size: int, num_workers: int = 0, pin_memory: bool = False):
        self.task, self.batch_size = task, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.next_index = 0

    def __iter__(self):
        stream = _BatchIndexStream(self.task, self.batch_size, self.next_index)
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=False, prefetch_factor=4))

    def mark_consumed(self, index: int) -> None:
        self.next_index = index + 1

    def state_dict(self) -> dict[str, int]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_index = int(state["next_index"])


class TaskDataModule(L.LightningDataModule):
    def __init__(self, task: Task, batch_size: int, eval_batch_size: int | None = None, num_workers: int = 0):
        super().__init__()
        self.task = task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_stream: ResumableBatchStream | None = None

    def train_dataloader(self) -> ResumableBatchStream:
        if self.train_stream is None:
            pin = torch.cuda.is_available()
            self.train_stream = ResumableBatchStream(self.task, self.batch_size, self.num_workers, pin)
        return self.train_stream

    def val_dataloader(self) -> DataLoader:
        test = self.task.test_set()
        keys = sorted(test)
        return DataLoader(_DictDataset(keys, TensorDataset(*[test[k] for k in keys])), batch_size=self.eval_batch_size)


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, keys: list[str], inner: TensorDataset):
        self.keys, self.inner = keys, inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, self.inner[i]))
