"""Every preset in conf/model and conf/data composes under Hydra and builds (model) or samples (task)."""

from pathlib import Path

import hybrid.conf
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from hybrid.data import build_task
from hybrid.model import HybridLM, model_config

CONF = Path(hybrid.conf.__file__).parent
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("_"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
NEEDS_FILES = {"text_folder", "hf"}  # need a user's folder or the `datasets` library


def _compose(*overrides):
    with initialize_config_module("hybrid.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("name", MODELS)
def test_model_preset_builds(name):
    cfg = _compose(f"model={name}")
    model = HybridLM(model_config(cfg["model"]))
    assert model.num_params() > 0 and model.pattern.n_layers >= 1


@pytest.mark.parametrize("name", [d for d in DATA if d not in NEEDS_FILES])
def test_data_preset_builds(name):
    cfg = _compose(f"data={name}")
    task = build_task(cfg["data"])
    assert task.vocab_size >= 2 and task.seq_len >= 1
