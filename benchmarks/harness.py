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
