"""Load a local Hugging Face checkpoint directory (single or sharded safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from worker.engine.model.config import ModelConfig
from worker.engine.model.llama import LlamaModel, RotaryEmbedding


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
) -> LlamaModel:
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = LlamaModel(cfg, max_positions)
    # Materialise uninitialised (cheap) storage on the target device, then copy weights in.
    model = model.to_empty(device=device)
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = sf.get_tensor(name)
    model.load_hf_state_dict(tensors)
    model.to(dtype=dtype)
    # Rotary tables are computed, not loaded, and stay fp32 as transformers keeps them.
    model.rotary = RotaryEmbedding(cfg, max_positions).to(device)
    model.eval()
    model.requires_grad_(False)
    return model
