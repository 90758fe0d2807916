"""Two model versions side by side: what each is, its training metrics, and its evaluations on
the files both were evaluated on (matched by SHA-256, kind and columns), with the differences."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from shared.model_store import EVALUATIONS_KEY, ModelVersion

_FIELDS = ("kind", "parent", "compressed_from", "quantization", "size_bytes", "data_sha256")


def _evaluations(version: ModelVersion) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for entry in version.metadata.get(EVALUATIONS_KEY, []):
        if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict):
            key = (entry.get("kind"), entry.get("data_sha256"), tuple(entry.get("columns") or ()), entry.get("k"))
            out[key] = entry  # the latest of the same file wins
    return out


def _delta(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return round(float(b) - float(a), 6)
    return None


def compare_versions(a: ModelVersion, b: ModelVersion) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for field in _FIELDS:
        va, vb = a.metadata.get(field), b.metadata.get(field)
        if va is not None or vb is not None:
            rows.append({"what": field, "a": va, "b": vb, "delta": _delta(va, vb) if field == "size_bytes" else None})
    ma, mb = a.metadata.get("metrics") or {}, b.metadata.get("metrics") or {}
    for metric in sorted(set(ma) | set(mb)):
        rows.append({"what": f"metrics: {metric}", "a": ma.get(metric), "b": mb.get(metric),
                     "delta": _delta(ma.get(metric), mb.get(metric))})  # fmt: skip
    ea, eb = _evaluations(a), _evaluations(b)
    shared = [key for key in ea if key in eb]
    for key in shared:
        kind, sha, _columns, _k = key
        for metric in sorted(set(ea[key]["metrics"]) | set(eb[key]["metrics"])):
            va, vb = ea[key]["metrics"].get(metric), eb[key]["metrics"].get(metric)
            rows.append({"what": f"{kind} on {str(sha)[:12]} ({ea[key].get('rows')} rows): {metric}", "a": va, "b": vb,
                         "delta": _delta(va, vb)})  # fmt: skip
    only = [f"{a.ref}: {k[0]} on {str(k[1])[:12]}" for k in ea if k not in eb]
    only += [f"{b.ref}: {k[0]} on {str(k[1])[:12]}" for k in eb if k not in ea]
    for version in (a, b):
        record = version.metadata.get("compression")
        if isinstance(record, dict):
            latency = record.get("latency") or {}
            weights = record.get("weights") or {}
            rows.append(
                {
                    "what": f"{version.ref}: int8 memory ratio",
                    "a": None,
                    "b": weights.get("memory_ratio"),
                    "delta": None,
                }
            )
            for which in ("batch_1", "best_batch"):
                if which in latency:
                    rows.append({"what": f"{version.ref}: speedup at {which.replace('_', ' ')}", "a": None,
                                 "b": latency[which].get("speedup"), "delta": None})  # fmt: skip
    return {"a": a.ref, "b": b.ref, "rows": rows, "evaluated_on_both": len(shared), "evaluated_on_one": only}


def render_comparison(comparison: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{comparison['a']}  vs  {comparison['b']}")
    table.add_column("")
    table.add_column(comparison["a"], justify="right")
    table.add_column(comparison["b"], justify="right")
    table.add_column("b - a", justify="right")

    def shown(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    for row in comparison["rows"]:
        table.add_row(row["what"], shown(row["a"]), shown(row["b"]), shown(row["delta"]))
    console.print(table)
    if not comparison["evaluated_on_both"]:
        console.print(
            "no evaluation on a file both were evaluated on: `conveyor models evaluate` each with the same --data"
        )
    for line in comparison["evaluated_on_one"]:
        console.print(f"only {line}")
