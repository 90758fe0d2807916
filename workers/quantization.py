"""Compressed versions as they are served: a version whose ``conveyor.json`` says
``"quantization": "int8-dynamic"`` keeps its parent's fp32 Hugging Face weights, and each
worker quantizes the Linear layers when it loads them (``torch.ao.quantization.quantize_dynamic``).

Why at load time rather than a saved int8 state dict: loading a saved one still builds the fp32
model first and quantizes its structure before ``load_state_dict``, so it costs the same (0.5 s
for MiniLM, 1.7 s for Whisper tiny on 2 busy cores), while plain fp32 files stay loadable by
any Hugging Face tool and by a GPU, and the result is the same every time (the quantization is
a deterministic function of the weights). int8 dynamic kernels exist for CPUs only: on a GPU a
compressed version is served from the same fp32 weights at the device's half precision.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Final

import torch

log = logging.getLogger(__name__)

QUANTIZATION_KEY: Final = "quantization"
INT8_DYNAMIC: Final = "int8-dynamic"
METHODS: Final = {"int8": INT8_DYNAMIC}  # a compress job's method -> what its version's metadata says


def quantization_of(model_dir: Path) -> str | None:
    """What the version in ``model_dir`` asks for (None: nothing; its weights as they are)."""
    try:
        meta = json.loads((Path(model_dir) / "conveyor.json").read_text())
    except (OSError, ValueError):
        return None
    value = meta.get(QUANTIZATION_KEY) if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every Linear layer int8: weights quantized once, per output channel;
    activations per batch. Per-channel weights, measured on MiniLM over SMS texts: mean cosine
    of the sentence embeddings to fp32's 0.964 (per-tensor, the default: 0.918), at the same speed."""
    with warnings.catch_warnings():  # torch.ao's deprecation notice (torchao is its successor); it works as documented
        warnings.simplefilter("ignore", DeprecationWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)
    # The model cache counts parameters and buffers, plus ``nbytes``: the packed int8 weights.
    plain = sum(t.numel() * t.element_size() for t in (*quantized.parameters(), *quantized.buffers()))
    quantized.nbytes = module_bytes(quantized) - plain
    return quantized


def for_serving(model: Any, model_dir: Path, device: str) -> Any:
    """The model as the version in ``model_dir`` is served on ``device`` (call it on the fp32
    model on the CPU, before moving it): int8 on a CPU where the metadata says so."""
    method = quantization_of(model_dir)
    if method is None:
        return model
    if method != INT8_DYNAMIC:
        raise ValueError(f"{model_dir.name}: unknown quantization {method!r} in its conveyor.json")
    if not device.startswith("cpu"):
        log.warning("%s is int8-dynamic, which runs on CPUs only: serving its fp32 weights on %s", model_dir, device)
        return model
    return quantize_int8(model)


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights as held in memory, int8 packed weights included (they are
    neither parameters nor buffers, so ``parameters()`` misses them)."""
    total = 0
    seen: set[int] = set()  # tied weights (Whisper's output projection) appear under two keys
    for value in model.state_dict().values():
        for tensor in value if isinstance(value, tuple) else (value,):
            if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def linear_share(model: torch.nn.Module) -> float:
    """The fraction of a model's parameters that are Linear weights: what int8 dynamic quantizes."""
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear / total if total else 0.0
