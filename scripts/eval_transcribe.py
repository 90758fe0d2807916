"""Word error rate of the transcription runner on speech with known text.

    .venv/bin/python scripts/eval_transcribe.py [--json] [--sources librispeech,moonshine,...]

Sources (each skipped, with the reason, when its files or tools are absent):
  librispeech  12 LibriSpeech clips, ../shared/data/speech (read in place)
  moonshine    moonshine-voice's bundled recordings whose text is established: beckett.wav
               (Beckett, "Worstward Ho") and endgame_nagg_nell.wav (TTS of Beckett's "Endgame"
               lines listed in moonshine's scripts/generate-diarization-test-audio.py).
               clone-test.wav is left out: no published text matches what it says.
  audioeval    pytest-audioeval's English WAVs with their .txt references
  synthetic    Harvard sentences spoken by flite and espeak-ng voices, reported per voice
  long         clips over 30 s, decoded as overlapping windows and stitched: two_cities.wav
               (44 s, the first paragraph of A Tale of Two Cities) and all LibriSpeech clips joined
Text is normalized before scoring: case, punctuation, hyphens, digits spelled out, Mr/Mrs/Dr.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPEECH_DIR: Final = ROOT.parent / "shared" / "data" / "speech"
SOURCES: Final = ("librispeech", "moonshine", "audioeval", "synthetic", "long")

# Harvard sentences, list 1 (IEEE 1969 recommended practice; public domain).
HARVARD: Final = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
)
# (label, command before the text and output path); speeds in words per minute for espeak-ng.
VOICES: Final = (
    ("flite slt", ["flite", "-voice", "slt"]),
    ("flite rms", ["flite", "-voice", "rms"]),
    ("flite awb", ["flite", "-voice", "awb"]),
    ("espeak-ng en-us 175wpm", ["espeak-ng", "-v", "en-us"]),
    ("espeak-ng en-us 130wpm gap10", ["espeak-ng", "-v", "en-us", "-s", "130", "-g", "10"]),
    ("espeak-ng en-gb 150wpm", ["espeak-ng", "-v", "en-gb", "-s", "150"]),
)
TWO_CITIES: Final = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way - in short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only."
)
BECKETT: Final = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."
ENDGAME: Final = (
    "Do you hear me? Yes. Do you hear me? Yes. We laugh less heartily, so we have still that resource. "
    "We laugh less heartily, so we have still that resource? No, not heartily, just less heartily. "
    "Ah that's a good story, ah that's a good story. What are you talking about? Laughing. "
    "I thought you were in pain. Not now. Do you remember the day I went and fetched you from that ditch? No."
)


# -- normalization and scoring ---------------------------------------------------------------------
_ONES: Final = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS: Final = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ABBREVIATIONS: Final = {"mr": "mister", "mrs": "missus", "dr": "doctor"}


def number_words(n: int) -> str:
    """Cardinal number in words, without 'and' (LibriSpeech's style): 125 -> one hundred twenty five."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    for value, name in ((10**9, "billion"), (10**6, "million"), (1000, "thousand")):
        if n >= value:
            rest = n % value
            return number_words(n // value) + " " + name + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError("unreachable")


def normalize(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"[-\u2013\u2014]", " ", text)  # fat-mutton == fat mutton
    text = re.sub(r"[^\w\s']", " ", text)
    words: list[str] = []
    for word in text.split():
        word = word.strip("'")
        if word.isdigit():
            words.extend(number_words(int(word)).split())
        elif word:
            words.append(_ABBREVIATIONS.get(word, word))
    return " ".join(words)


@dataclass
class Score:
    ref_words: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        return self.errors / max(self.ref_words, 1)


def score(reference: str, hypothesis: str) -> Score:
    import jiwer

    ref, hyp = normalize(reference), normalize(hypothesis)
    if not hyp:
        return Score(len(ref.split()), 0, len(ref.split()), 0)
    out = jiwer.process_words(ref, hyp)
    return Score(len(ref.split()), out.substitutions, out.deletions, out.insertions)


# -- clips -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    source: str
    group: str  # the voice for synthetic speech; the source otherwise
    name: str
    path: Path
    reference: str


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def librispeech_rows() -> list[dict[str, str]]:
    with (SPEECH_DIR / "transcripts.tsv").open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def librispeech_clips() -> Iterator[Clip]:
    for row in librispeech_rows():
        yield Clip("librispeech", row["subset"], row["id"], SPEECH_DIR / row["file"], row["transcript"])


def moonshine_clips() -> Iterator[Clip]:
    assets = (_package_dir("moonshine_voice") or Path("/nonexistent")) / "assets"
    for name, text in (("beckett.wav", BECKETT), ("endgame_nagg_nell.wav", ENDGAME)):
        yield Clip("moonshine", "moonshine", name, assets / name, text)


def audioeval_clips() -> Iterator[Clip]:
    base = (_package_dir("pytest_audioeval") or Path("/nonexistent")) / "samples" / "audio" / "en"
    for wav in sorted(base.glob("*.wav")):
        yield Clip("audioeval", "audioeval", wav.name, wav, wav.with_suffix(".txt").read_text().strip())


def synthetic_clips(workdir: Path) -> Iterator[Clip]:
    for label, command in VOICES:
        if shutil.which(command[0]) is None:
            print(f"skipping {label}: {command[0]} is not installed (apt-get install flite espeak-ng)", file=sys.stderr)
            continue
        for i, sentence in enumerate(HARVARD):
            out = workdir / f"{label.replace(' ', '_')}_{i}.wav"
            if command[0] == "flite":
                args = [*command, "-t", sentence, "-o", str(out)]
            else:
                args = [*command, "-w", str(out), sentence]
            subprocess.run(args, check=True, capture_output=True)
            yield Clip("synthetic", label, f"harvard-1.{i + 1}", out, sentence)


def long_clips(workdir: Path) -> Iterator[Clip]:
    assets = (_package_dir("moonshine_voice") or Path("/nonexistent")) / "assets"
    yield Clip("long", "long", "two_cities.wav", assets / "two_cities.wav", TWO_CITIES)
    if SPEECH_DIR.is_dir():
        path, text = join_librispeech(librispeech_rows(), workdir / "librispeech_joined.flac")
        yield Clip("long", "long", "librispeech-joined", path, text)


def join_librispeech(rows: list[dict[str, str]], out: Path, gap_s: float = 0.3) -> tuple[Path, str]:
    """All clips in one file with short pauses between them, and the joined reference."""
    import numpy as np
    import soundfile as sf

    parts = []
    for row in rows:
        audio, rate = sf.read(SPEECH_DIR / row["file"], dtype="float32")
        parts += [audio, np.zeros(int(gap_s * rate), dtype="float32")]
    sf.write(out, np.concatenate(parts), rate)
    return out, " ".join(row["transcript"] for row in rows)


# -- running ---------------------------------------------------------------------------------------
@dataclass
class ClipResult:
    source: str
    group: str
    name: str
    duration_s: float
    ref_words: int
    substitutions: int
    deletions: int
    insertions: int
    wer: float
    hypothesis: str
    reference: str


def collect(sources: list[str], workdir: Path) -> list[Clip]:
    makers = {
        "librispeech": lambda: librispeech_clips() if SPEECH_DIR.is_dir() else iter(()),
        "moonshine": moonshine_clips,
        "audioeval": audioeval_clips,
        "synthetic": lambda: synthetic_clips(workdir),
        "long": lambda: long_clips(workdir),
    }
    clips = []
    for source in sources:
        found = list(makers[source]())
        for clip in found:
            if not clip.path.is_file():
                print(f"skipping {clip.name}: {clip.path} not found", file=sys.stderr)
        clips += [c for c in found if c.path.is_file()]
    return clips


def evaluate(clips: list[Clip], model: str, beam_size: int, batch_jobs: int) -> tuple[list[ClipResult], float]:
    from shared.jobs import TranscribeJob
    from shared.model_store import ModelStore
    from shared.settings import Settings
    from workers.model_cache import ModelCache
    from workers.runners.transcribe import TranscribeRunner, transcribe_jobs
    from workers.whisper_convert import prepare_default_models

    # Jobs read files only under the input roots: here, the directories of these clips.
    os.environ["CONVEYOR_INPUT_ROOTS"] = os.pathsep.join(sorted({str(Path(c.path).resolve().parent) for c in clips}))
    store = ModelStore(Settings().models_path)
    prepare_default_models(store)
    runner = TranscribeRunner(store, ModelCache(4 << 30), "cpu")
    results: list[ClipResult] = []
    started = time.perf_counter()
    for first in range(0, len(clips), batch_jobs):
        chunk = clips[first : first + batch_jobs]
        jobs = [TranscribeJob(audio_path=str(c.path), model=model, beam_size=beam_size) for c in chunk]
        for clip, out in zip(chunk, transcribe_jobs(runner, jobs)):
            if isinstance(out, Exception):
                raise SystemExit(f"{clip.name}: {type(out).__name__}: {out}")
            s = score(clip.reference, out["text"])
            results.append(
                ClipResult(
                    clip.source,
                    clip.group,
                    clip.name,
                    out["duration_s"],
                    s.ref_words,
                    s.substitutions,
                    s.deletions,
                    s.insertions,
                    round(s.wer, 4),
                    out["text"],
                    clip.reference,
                )
            )
    return results, time.perf_counter() - started


def summarize(results: list[ClipResult]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[ClipResult]] = {}
    for r in results:
        groups.setdefault((r.source, r.group), []).append(r)
    groups[("all", "all")] = results
    rows = []
    for (source, group), members in groups.items():
        words = sum(r.ref_words for r in members)
        errors = sum(r.substitutions + r.deletions + r.insertions for r in members)
        rows.append(
            {
                "source": source,
                "group": group,
                "clips": len(members),
                "audio_s": round(sum(r.duration_s for r in members), 1),
                "ref_words": words,
                "wer": round(errors / max(words, 1), 4),
            }
        )
    return rows


def print_table(results: list[ClipResult], summary: list[dict[str, Any]], elapsed: float) -> None:
    print(f"{'source':<12} {'group/voice':<30} {'clip':<24} {'dur s':>6} {'words':>5} {'S/D/I':>8} {'WER':>6}")
    for r in results:
        sdi = f"{r.substitutions}/{r.deletions}/{r.insertions}"
        print(f"{r.source:<12} {r.group:<30} {r.name:<24} {r.duration_s:>6.1f} {r.ref_words:>5} {sdi:>8} {r.wer:>6.1%}")
    print()
    print(f"{'source':<12} {'group/voice':<30} {'clips':>5} {'audio s':>8} {'words':>6} {'WER':>6}")
    for row in summary:
        print(
            f"{row['source']:<12} {row['group']:<30} {row['clips']:>5} {row['audio_s']:>8.1f} "
            f"{row['ref_words']:>6} {row['wer']:>6.1%}"
        )
    audio = sum(r.duration_s for r in results)
    print(f"\n{audio:.0f} s of audio in {elapsed:.0f} s ({audio / elapsed:.1f}x real time, CPU)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated subset of {','.join(SOURCES)}")
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--batch-jobs", type=int, default=16, help="jobs per run_batch call")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--show-text", action="store_true", help="print each hypothesis under its reference")
    args = parser.parse_args()
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = set(sources) - set(SOURCES)
    if unknown:
        parser.error(f"unknown sources: {', '.join(sorted(unknown))}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Before torch loads OpenMP: spinning threads crawl (3x slower here) when other processes share the cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory(prefix="conveyor-eval-") as tmp:
        clips = collect(sources, Path(tmp))
        results, elapsed = evaluate(clips, args.model, args.beam_size, args.batch_jobs)
    summary = summarize(results)
    if args.json:
        print(json.dumps({"clips": [asdict(r) for r in results], "summary": summary, "elapsed_s": elapsed}, indent=2))
        return 0
    print_table(results, summary, elapsed)
    if args.show_text:
        for r in results:
            print(f"\n[{r.name}] WER {r.wer:.1%}\n  ref: {normalize(r.reference)}\n  hyp: {normalize(r.hypothesis)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
