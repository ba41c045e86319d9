"""Run every benchmark; write benchmarks/results/<name>.json, summary.json and summary.md.

Every benchmarks/bench_<name>.py is run (the known ones first, in a fixed order, then any other
found), so a new benchmark is recorded without editing this list. `--quick` runs write to
benchmarks/results/quick/ instead, so `make test` never overwrites the record of a full run.

Each benchmark module exposes `run(quick: bool) -> dict` and measures its own reference in the
same run (iperf3, memcpy, zstd/lz4 CLIs, PySyncObj/etcd), so figures are ratios, not absolutes.
A benchmark that cannot run here (no root for namespaces, a missing tool) is recorded with the
reason instead of failing the whole run.

    .venv/bin/python -m benchmarks.run_all [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ("kernels", "datapath", "pipeline", "crypto", "hde", "repeat_migration", "acp", "prediction", "wan", "sparse",
         "live")
FOUND = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))
BENCHMARKS = tuple(n for n in ORDER if n in FOUND) + tuple(n for n in FOUND if n not in ORDER)


def _markdown(name: str, module: Any, result: dict[str, Any]) -> str:
    render = getattr(module, "markdown", None)
    if render is not None:
        try:
            return str(render(result))
        except (KeyError, TypeError, ValueError):
            pass
    return f"### {name}\n\n```json\n{json.dumps(result, indent=1, default=str)[:4000]}\n```"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs (minutes instead of tens of minutes)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args(argv)
    results = RESULTS / "quick" if args.quick else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tools"))
    summary: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick}
    sections = [f"# Benchmarks ({'quick' if args.quick else 'full'}, {summary['started']})"]
    failed = 0
    for name in args.only or BENCHMARKS:
        started = time.monotonic()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            result = module.run(args.quick)
            summary[name] = {"ok": True, "seconds": round(time.monotonic() - started, 1), "result": result}
            (results / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
            sections.append(_markdown(name, module, result))
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            failed += 1
            summary[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()}
            sections.append(f"### {name}\n\nnot run: {type(exc).__name__}: {exc}")
        print(sections[-1], flush=True)
    (results / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (results / "summary.md").write_text("\n\n".join(sections) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
