from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine.demo_model import write_demo_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("tiny-llama"), "tiny", "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 with q/k/v bias and tied embeddings, as small Qwen2 checkpoints ship."""
    return write_demo_model(
        tmp_path_factory.mktemp("tiny-qwen2"), "tiny", "qwen2", seed=2, tie_word_embeddings=True
    )
