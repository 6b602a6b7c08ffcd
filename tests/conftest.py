"""Shared fixtures: small task configs, tokenizers and tiny models built in the test (no network)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# trackio reads TRACKIO_DIR once, at import: point it at a scratch folder before any test imports it
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="mechrl-test-trackio-"))

from mechrl.config import CardsTaskConfig, TinyModelConfig  # noqa: E402
from mechrl.models.loading import build_tiny_model, prepare_tokenizer  # noqa: E402
from mechrl.tasks import build_task  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, saying why, where there is no CUDA device (`make test-all` on a CPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_cards_cfg() -> CardsTaskConfig:
    return CardsTaskConfig(n_train=2000, n_val=100, n_test=200, n_ood=200)


@pytest.fixture(scope="session")
def cards_task(small_cards_cfg):
    return build_task(small_cards_cfg)


@pytest.fixture(scope="session")
def cards_tok(cards_task):
    return prepare_tokenizer(cards_task.build_tokenizer())


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request, cards_tok):
    return build_tiny_model(TinyModelConfig(arch=request.param, n_layer=2, d_model=64, n_head=4), cards_tok, seed=0)
