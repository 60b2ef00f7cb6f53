from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from worker.engine.demo_model import write_demo_model

# A loaded 2-core CI machine draws examples slowly: that is no failure of the code under test.
settings.register_profile("breakwater", suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("breakwater")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("tiny-llama"), "tiny", "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 with q/k/v bias and tied embeddings, as small Qwen2 checkpoints ship."""
    return write_demo_model(
        tmp_path_factory.mktemp("tiny-qwen2"), "tiny", "qwen2", seed=2, tie_word_embeddings=True
    )
