"""Text corpora as lists of documents (bytes), split by a hash of each document's name.

Sources:
- ``stdlib``: the Python standard library source of the running interpreter, read as bytes. It is
  on every machine, needs no download, and the same interpreter version gives the same corpus (the
  recorded SHA-256 says whether two runs saw the same bytes). Falls back to torch's own ``.py`` files
  (with a warning) when the standard library ships only bytecode.
- ``folder``: every file matching ``patterns`` under a local folder.
- ``hf``: a Hugging Face ``datasets`` dataset, when the library is installed and the data is cached
  or reachable (``HF_DATASETS_OFFLINE=1`` is respected by the library itself).

The split is a pure function of the document's name (relative path, or row number for ``hf``), so it
is stable across machines and never mixes a file into two splits.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from hybrid.registry import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Document:
    name: str  # stable identity used for the split (relative path or row id)
    data: bytes


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
    """train / val / test from the first 8 bytes of SHA-256(name): stable everywhere."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _py_files(root: Path, include_tests: bool) -> list[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= {"test", "tests", "idlelib"}
    out = []
    for path in root.rglob("*.py"):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & skip:
            continue
        out.append(path)
    return sorted(out)


def stdlib_documents(include_tests: bool = False) -> tuple[list[Document], dict]:
    """The standard library ``.py`` files as documents, sorted by relative path."""
    docs, info = _stdlib_documents(include_tests)
    return list(docs), dict(info)


@functools.lru_cache(maxsize=2)  # read once per process: the files do not change under a running interpreter
def _stdlib_documents(include_tests: bool) -> tuple[tuple[Document, ...], dict]:
    root = stdlib_root()
    files = _py_files(root, include_tests) if root.is_dir() else []
    source = "stdlib"
    if not files:
        import torch

        root = Path(torch.__file__).parent
        warnings.warn(f"no .py files in the standard library at {stdlib_root()} (bytecode-only install?); "
                      f"using torch's source files under {root} instead", stacklevel=2)
        files, source = _py_files(root, include_tests), "torch"
    docs = tuple(Document(p.relative_to(root).as_posix(), p.read_bytes()) for p in files)
    return docs, {"source": source, "root": str(root), "python_version": sys.version.split()[0]}


def folder_documents(folder: str, patterns: list[str]) -> tuple[list[Document], dict]:
    root = Path(folder).expanduser()
    if not root.exists():
        raise ConfigError(f"text folder {str(root)!r} does not exist (set data.path to a folder of text files)")
    if not root.is_dir():
        raise ConfigError(f"text folder {str(root)!r} is not a folder")
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    files = [p for p in files if p.stat().st_size > 0]
    if not files:
        raise ConfigError(f"text folder {str(root)!r} has no non-empty files matching {', '.join(patterns)}")
    docs = [Document(p.relative_to(root).as_posix(), p.read_bytes()) for p in files]
    return docs, {"source": "folder", "root": str(root.resolve())}


def check_folder(folder: str | None, patterns: list[str]) -> None:
    """Cheap early check (no reading) so a bad folder fails before a model is built."""
    if not folder:
        raise ConfigError("source 'folder' needs data.path (a folder of text files)")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"text folder {str(root)!r} does not exist or is not a folder (set data.path)")
    if not any(p.is_file() and p.stat().st_size > 0 for pat in patterns for p in root.rglob(pat)):
        raise ConfigError(f"text folder {str(root)!r} has no non-empty files matching {', '.join(patterns)}")


def hf_documents(name: str, config: str | None, split: str, text_field: str) -> tuple[list[Document], dict]:
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError("source 'hf' needs the Hugging Face `datasets` library (pip install datasets); "
                          "the default source 'stdlib' needs nothing") from exc
    try:
        path = Path(name).expanduser()
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, missing, or a typo: one clear message
        raise ConfigError(f"cannot load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}. It must be cached locally or "
                          "reachable; set HF_DATASETS_OFFLINE=1 to use only the cache") from exc
    if text_field not in ds.column_names:
        raise ConfigError(f"dataset {name!r} has no column {text_field!r}; columns: {', '.join(ds.column_names)}")
    docs = [Document(f"row{i}", str(t).encode("utf-8")) for i, t in enumerate(ds[text_field])]
    return docs, {"source": "hf", "dataset": name, "config": config, "split": split}


def fingerprint(docs: list[Document]) -> str:
    """SHA-256 over the documents' names and bytes in order: equal hashes mean the same corpus."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode("utf-8", "surrogateescape") + b"\0" + len(d.data).to_bytes(8, "little") + d.data)
    return h.hexdigest()
