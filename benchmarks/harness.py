"""What every benchmark script shares: where results go and the `--quick` command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def save(name: str, result: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json (the same file run_all writes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def standalone(name: str, run: Callable[[bool], dict[str, Any]], doc: str | None,
               render: Callable[[dict[str, Any]], str] | None = None) -> None:
    """`python -m benchmarks.bench_<name> [--quick]`: run, save, print."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a first look")
    result = run(parser.parse_args().quick)
    save(name, result)
    print(render(result) if render else json.dumps(result, indent=2, default=str))


def spread(samples: list[float], digits: int = 3) -> dict[str, Any]:
    """Median and spread of repeated runs: {runs, median, min, max, spread_pct ((max-min)/median)}."""
    values = sorted(samples)
    if not values:
        return {"runs": 0}
    n = len(values)
    median = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    pct = (values[-1] - values[0]) / median * 100 if median else 0.0
    return {"runs": n, "median": round(median, digits), "min": round(values[0], digits),
            "max": round(values[-1], digits), "spread_pct": round(pct, 1)}


def cell(stats: dict[str, Any]) -> str:
    """A table cell for `spread` output: 'median (min-max)'."""
    if not stats.get("runs"):
        return "n/a"
    if stats["runs"] == 1:
        return f"{stats['median']}"
    return f"{stats['median']} ({stats['min']}-{stats['max']})"
