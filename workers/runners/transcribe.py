"""Batched Whisper transcription over 30 s windows.

A job's audio becomes one or more windows (``split_windows``); windows from many jobs
share one ``generate`` call when their decoding options match (``TranscribeRunner``);
a job's windows are then joined back into one transcript (``stitch``). Long audio is cut
into overlapping 30 s windows rather than decoded sequentially, so the windows of one
long job batch with each other and with short jobs alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from transformers import LogitsProcessor, LogitsProcessorList, WhisperForConditionalGeneration, WhisperProcessor

from shared.errors import ConveyorError, InvalidJob, TransientError
from shared.jobs import JobBase, TranscribeJob
from shared.model_store import ModelStore
from shared.results import Segment
from workers.audio import SAMPLE_RATE, load_job_audio
from workers.batcher import Batcher, BatchPolicy
from workers.kinds import Prepared
from workers.model_cache import ModelCache
from workers.quantization import for_serving

WINDOW_S: Final = 30.0
# Overlap on each side of a seam: a word cut by one window's edge lies whole in its neighbour.
STRIDE_S: Final = 5.0
_STEP_S: Final = WINDOW_S - 2 * STRIDE_S
# Two windows' copies of the same word land within this many seconds of each other.
_MATCH_TOLERANCE_S: Final = 2.0
_ENGLISH: Final = frozenset({"en", "english"})


@dataclass(frozen=True)
class DecodeOptions:
    model: str
    language: str | None = None
    beam_size: int = 1
    max_new_tokens: int | None = None
    timestamps: bool = False

    @classmethod
    def from_job(cls, job: TranscribeJob) -> DecodeOptions:
        return cls(job.model, job.language, job.beam_size, job.max_new_tokens, job.timestamps)


@dataclass(frozen=True, eq=False)
class Window:
    """At most 30 s of one job's audio, with where it starts in that audio."""

    samples: torch.Tensor  # float32 mono at 16 kHz
    offset: float  # seconds from the start of the job's audio
    index: int  # position among the job's windows
    options: DecodeOptions

    @property
    def duration(self) -> float:
        return self.samples.numel() / SAMPLE_RATE

    @property
    def end(self) -> float:
        return self.offset + self.duration


@dataclass(frozen=True)
class WindowOutput:
    text: str
    segments: list[Segment] | None  # times relative to the job's audio; None without timestamps
    language: str | None


def split_windows(audio: torch.Tensor, options: DecodeOptions) -> list[Window]:
    """One window for audio up to 30 s; otherwise full 30 s windows, evenly spaced, overlapping by at least 10 s."""
    total = audio.numel()
    size = int(WINDOW_S * SAMPLE_RATE)
    if total <= size:
        return [Window(audio, 0.0, 0, options)]
    # Seams are stitched by time, so long audio is always decoded with timestamps.
    options = dataclasses.replace(options, timestamps=True)
    # Even spacing: the fewest windows whose starts are at most one step apart, the last ending with the audio.
    gaps = math.ceil((total - size) / (_STEP_S * SAMPLE_RATE))
    starts = [round(k * (total - size) / gaps) for k in range(gaps + 1)]
    return [Window(audio[s : s + size], s / SAMPLE_RATE, i, options) for i, s in enumerate(starts)]


class _SuppressTokens(LogitsProcessor):
    """Whisper's token suppression with its masks built once per model.

    transformers' SuppressTokens(AtBegin)LogitsProcessor rebuild their masks with torch.isin
    over the whole vocabulary at every step: ~20 ms each per token on a CPU, a third of the
    decoding time. A fresh instance per generate call learns the prompt length from its first call.
    """

    def __init__(self, always: torch.Tensor, at_begin: torch.Tensor) -> None:
        self.always = always
        self.at_begin = at_begin
        self.begin_index: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.begin_index is None:
            self.begin_index = input_ids.shape[-1]
        masked = scores.masked_fill(self.always, -math.inf)
        if input_ids.shape[-1] == self.begin_index:
            masked = masked.masked_fill(self.at_begin, -math.inf)
        return masked  # type: ignore[return-value]  # a FloatTensor in, a FloatTensor out


@dataclass
class LoadedWhisper:
    model: WhisperForConditionalGeneration
    processor: WhisperProcessor
    suppress: torch.Tensor  # vocabulary masks of the tokens never generated / not generated first
    suppress_at_begin: torch.Tensor

    def logits_processor(self) -> LogitsProcessorList:
        return LogitsProcessorList([_SuppressTokens(self.suppress, self.suppress_at_begin)])

    # The model cache sizes entries by their parameters and buffers.
    def parameters(self) -> Any:
        return self.model.parameters()

    def buffers(self) -> Any:
        return self.model.buffers()

    @property
    def nbytes(self) -> int:  # an int8 model's packed weights (neither parameters nor buffers)
        return int(getattr(self.model, "nbytes", 0))


def _vocab_mask(token_ids: list[int] | None, size: int, device: str) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    mask[list(token_ids or [])] = True
    return mask


def _load_whisper(path: Path, device: str) -> LoadedWhisper:
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "whisper":
        raise InvalidJob(f"model at {path} is a {config.get('model_type')!r} model, not a Whisper checkpoint")
    # fp16 on GPUs; on CPUs fp16/bf16 matmuls are many times slower than fp32.
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype)
    model = for_serving(model, path, device)  # int8 where its metadata says (CPU only)
    model.to(device).eval()
    generation_config = model.generation_config
    vocab = model.config.vocab_size
    suppress = _vocab_mask(generation_config.suppress_tokens, vocab, device)
    at_begin = _vocab_mask(generation_config.begin_suppress_tokens, vocab, device)
    # Suppression moves to _SuppressTokens, so transformers' slower processors are not added.
    generation_config.suppress_tokens = None
    generation_config.begin_suppress_tokens = None
    return LoadedWhisper(model, WhisperProcessor.from_pretrained(path), suppress, at_begin)


_GroupKey = tuple[Path, str | None, int, int | None, bool]


class TranscribeRunner:
    def __init__(self, store: ModelStore, cache: ModelCache, device: str = "cpu") -> None:
        self.store = store
        self.cache = cache
        self.device = device

    def cost(self, window: Window) -> int:
        return 1  # every window is padded to 30 s, so all cost the same

    def run_batch(self, windows: Sequence[Window]) -> list[WindowOutput | Exception]:
        results: list[WindowOutput | Exception | None] = [None] * len(windows)
        paths: dict[str, Path | ConveyorError] = {}
        groups: dict[_GroupKey, list[int]] = {}
        for i, window in enumerate(windows):
            opts = window.options
            if opts.model not in paths:
                try:
                    paths[opts.model] = self.store.resolve(opts.model).path
                except ConveyorError as exc:
                    paths[opts.model] = exc
            path = paths[opts.model]
            if isinstance(path, ConveyorError):
                results[i] = path
                continue
            key = (path, opts.language, opts.beam_size, opts.max_new_tokens, opts.timestamps)
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            try:
                outputs: Sequence[WindowOutput | Exception] = self._decode_group(key, [windows[i] for i in members])
            except ConveyorError as exc:
                outputs = [exc] * len(members)
            except torch.OutOfMemoryError as exc:
                outputs = [TransientError(f"out of device memory decoding {len(members)} windows: {exc}")] * len(
                    members
                )
            for i, output in zip(members, outputs):
                results[i] = output
        return [r if r is not None else RuntimeError("window was not decoded") for r in results]

    def _decode_group(self, key: _GroupKey, windows: list[Window]) -> list[WindowOutput]:
        path, language, beam_size, max_new_tokens, timestamps = key
        loaded = self.cache.get(str(path), lambda: _load_whisper(path, self.device))
        model, processor = loaded.model, loaded.processor
        generation_config = model.generation_config
        kwargs: dict[str, Any] = {"num_beams": beam_size, "return_timestamps": timestamps}
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        if getattr(generation_config, "is_multilingual", False):
            kwargs["language"] = language
            spoken = language
        elif language is None or language.lower() in _ENGLISH:
            spoken = "en"
        else:
            raise InvalidJob(
                f"model {windows[0].options.model} is English-only; language {language!r} is not supported"
            )
        # Every window is padded to 30 s, as Whisper was trained; the mask marks the real frames.
        inputs = processor.feature_extractor(
            [w.samples.numpy() for w in windows],
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            return_attention_mask=True,
        )
        features = inputs.input_features.to(self.device, dtype=model.dtype)
        kwargs["attention_mask"] = inputs.attention_mask.to(self.device)
        with torch.inference_mode():
            # With timestamps, generate re-decodes the audio after the last complete segment
            # (as OpenAI's decoder does) and reports each segment with window-relative times.
            generated = model.generate(
                features, return_segments=timestamps, logits_processor=loaded.logits_processor(), **kwargs
            )
        eot = generation_config.eos_token_id
        outputs = []
        for b, window in enumerate(windows):
            if timestamps:
                segments = _segments(processor, generated["segments"][b], window, eot)
                text = " ".join(s.text for s in segments)
            else:
                text = _decode_text(processor, generated[b].tolist(), eot)
                segments = None
            outputs.append(WindowOutput(text, segments, spoken))
        return outputs


def _decode_text(processor: WhisperProcessor, tokens: list[int], eot: int) -> str:
    # Ids from <|endoftext|> up are specials and timestamps (<|0.00|>.. are not marked special).
    return str(processor.tokenizer.decode([t for t in tokens if t < eot])).strip()


def _segments(processor: WhisperProcessor, found: list[dict[str, Any]], window: Window, eot: int) -> list[Segment]:
    segments = []
    for seg in found:
        text = _decode_text(processor, seg["tokens"].tolist(), eot)
        if not text:
            continue
        start = min(float(seg["start"]), window.duration)
        end = min(max(float(seg["end"]), start), window.duration)
        segments.append(Segment(start=round(window.offset + start, 2), end=round(window.offset + end, 2), text=text))
    return segments


# -- stitching ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Word:
    text: str
    start: float
    end: float
    window: int
    segment: int

    @property
    def mid(self) -> float:
        return (self.start + self.end) / 2

    @property
    def key(self) -> str:
        return re.sub(r"[^\w']", "", self.text.lower())


def _words(output: WindowOutput, window: int) -> list[_Word]:
    """Words with times spread over their segment in proportion to their length."""
    words: list[_Word] = []
    for s, segment in enumerate(output.segments or []):
        parts = segment.text.split()
        total = sum(len(p) + 1 for p in parts)
        t, per_char = segment.start, (segment.end - segment.start) / max(total, 1)
        for part in parts:
            end = t + (len(part) + 1) * per_char
            words.append(_Word(part, t, end, window, s))
            t = end
    return words


def _cut(left: list[_Word], right: list[_Word], seam: float, overlap: tuple[float, float]) -> tuple[int, int]:
    """Where to leave ``left`` and join ``right``: the common word nearest the seam, else the seam itself."""
    lo, hi = overlap[0] - _MATCH_TOLERANCE_S, overlap[1] + _MATCH_TOLERANCE_S
    li = [i for i, w in enumerate(left) if w.mid >= lo]
    ri = [j for j, w in enumerate(right) if w.mid <= hi]
    a, b = [left[i].key for i in li], [right[j].key for j in ri]
    best: tuple[float, int, int] | None = None
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    # A run of two or more common words is far less likely to be a coincidence than one word.
    min_size = 2 if any(block.size >= 2 for block in blocks) else 1
    for block in blocks:
        if block.size < min_size:
            continue
        for k in range(block.size):
            lw, rw = left[li[block.a + k]], right[ri[block.b + k]]
            if not lw.key or abs(lw.mid - rw.mid) > _MATCH_TOLERANCE_S:
                continue
            distance = abs((lw.mid + rw.mid) / 2 - seam)
            if best is None or distance < best[0]:
                best = (distance, li[block.a + k], ri[block.b + k])
    if best is not None:
        return best[1], best[2]
    return (
        next((i for i, w in enumerate(left) if w.mid >= seam), len(left)),
        next((j for j, w in enumerate(right) if w.mid >= seam), len(right)),
    )


def stitch(windows: Sequence[Window], outputs: Sequence[WindowOutput]) -> tuple[str, list[Segment]]:
    """Join one job's windows (in order) into its text and segments, each overlap counted once."""
    if len(windows) == 1:
        return outputs[0].text, list(outputs[0].segments or [])
    merged = _words(outputs[0], 0)
    for k in range(1, len(windows)):
        prev, cur = windows[k - 1], windows[k]
        overlap = (cur.offset, prev.end)
        seam = (overlap[0] + overlap[1]) / 2
        right = _words(outputs[k], k)
        # Only the previous window's words can reach into this overlap.
        tail_from = next((i for i, w in enumerate(merged) if w.window == k - 1), len(merged))
        i, j = _cut(merged[tail_from:], right, seam, overlap)
        merged = merged[: tail_from + i] + right[j:]
    return " ".join(w.text for w in merged), _regroup(merged, outputs)


def _regroup(words: list[_Word], outputs: Sequence[WindowOutput]) -> list[Segment]:
    """Segments again from kept words: whole segments keep their times, cut ones shrink to their words."""
    segments: list[Segment] = []
    group: list[_Word] = []
    for word in [*words, None]:
        if group and (word is None or (word.window, word.segment) != (group[0].window, group[0].segment)):
            source = (outputs[group[0].window].segments or [])[group[0].segment]
            whole = len(group) == len(source.text.split())
            start, end = (source.start, source.end) if whole else (group[0].start, group[-1].end)
            segments.append(Segment(start=round(start, 2), end=round(end, 2), text=" ".join(w.text for w in group)))
            group = []
        if word is not None:
            group.append(word)
    return segments


# -- the job kind ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Audio:
    samples: int
    windows: list[Window]


class TranscribeKind:
    """transcribe jobs: items are 30 s windows; windows of many jobs share one ``generate``."""

    job_type = "transcribe"
    slow_prepare = True  # decoding and resampling audio: off the ingest thread

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.store = store
        self.runner = TranscribeRunner(store, cache, device)

    def build_batcher(self, policy: BatchPolicy) -> Batcher[Any, Any]:
        # Each item is one 30 s window: the batch size bounds the windows per generate call.
        return Batcher(self.runner.run_batch, policy, cost=self.runner.cost, name="transcribe-batcher")

    def prepare(self, jobs: Sequence[JobBase]) -> list[Prepared | BaseException]:
        out: list[Prepared | BaseException] = []
        for job in jobs:
            assert isinstance(job, TranscribeJob)
            try:
                version = self.store.resolve(job.model)  # fail fast on an unknown model, before decoding audio
                options = dataclasses.replace(DecodeOptions.from_job(job), model=version.ref)  # @latest pinned
                audio = load_job_audio(job)
                windows = split_windows(audio, options)
            except ConveyorError as exc:
                out.append(exc)
                continue
            out.append(Prepared(list(windows), version.ref, context=_Audio(audio.numel(), windows)))
        return out

    def finish(self, job: JobBase, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        assert isinstance(job, TranscribeJob)
        audio: _Audio = prepared.context
        text, segments = stitch(audio.windows, outputs)
        return {
            "text": text,
            "duration_s": round(audio.samples / SAMPLE_RATE, 3),
            "language": outputs[0].language,
            "segments": [seg.model_dump(mode="json") for seg in segments] if job.timestamps else None,
        }


# -- in-process use -------------------------------------------------------------------------------
def transcribe_jobs(runner: TranscribeRunner, jobs: Sequence[TranscribeJob]) -> list[dict[str, Any] | Exception]:
    """Decode, window, run every window in one ``run_batch``, stitch. Fields as in ``TranscribeResult``, less meta."""
    kind = TranscribeKind(runner.store, runner.cache, runner.device)
    kind.runner = runner
    prepared = kind.prepare(jobs)
    flat = [w for p in prepared if isinstance(p, Prepared) for w in p.items]
    outputs = iter(runner.run_batch(flat))
    results: list[dict[str, Any] | Exception] = []
    for job, item in zip(jobs, prepared):
        if isinstance(item, BaseException):
            results.append(item if isinstance(item, Exception) else RuntimeError(str(item)))
            continue
        mine = [next(outputs) for _ in item.items]
        failed = next((o for o in mine if isinstance(o, Exception)), None)
        if failed is not None:
            results.append(failed)
            continue
        results.append({"job_id": job.id, **kind.finish(job, item, mine)})
    return results
