"""`python -m bench` (`make bench`): run every bench/bench_*.py and write one table under bench/results/.

Each module exposes ``bench(tmp_dir: Path) -> list[dict]``; a row is
``{"name", "value", "unit", "baseline", "baseline_value", "ratio", "goal"}`` where ``ratio`` = value / baseline
(or as the row defines it) and ``goal`` is a human string such as "≤ 0.05" or "≥ 5×". Figures are measured in
the same run as their baselines because the machines are noisy; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(rows: list[dict], info: dict, started: str) -> str:
    lines = [
        "# wanwu benchmarks",
        "",
        f"Run {started} with `make bench` on {info.get('cpu_count')} cores, {info.get('mem_gib')} GiB, "
        f"{info.get('device', 'cpu')}, Python {info.get('python')}, torch {info.get('torch', '?')}.",
        "",
        "| benchmark | figure | unit | baseline (same run) | baseline figure | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = r.get("met")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    _fmt(r.get("value")),
                    r.get("unit", ""),
                    r.get("baseline", ""),
                    _fmt(r.get("baseline_value")),
                    _fmt(r.get("ratio")),
                    r.get("goal", ""),
                    "" if met is None else ("yes" if met else "no"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="run only these modules, e.g. collect autolabel")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from wanwu.offline import harden

    harden(HERE.parent)
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if n in args.only]
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[dict] = []
    failures = 0
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        t0 = time.perf_counter()
        print(f"== bench {name}", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix=f"wanwu-bench-{name}-") as tmp:
                got = module.bench(Path(tmp))
        except Exception:
            failures += 1
            traceback.print_exc()
            got = [{"name": f"{name}: FAILED", "value": None, "unit": "", "goal": "runs"}]
        for r in got:
            r.setdefault("module", name)
            print("   ", {k: r.get(k) for k in ("name", "value", "unit", "ratio", "goal")}, flush=True)
        rows.extend(got)
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    info = machine()
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if not args.only else "-" + "-".join(args.only)
    (RESULTS / f"results{suffix}.json").write_text(
        json.dumps({"started": started, "machine": info, "rows": rows}, ensure_ascii=False, indent=2)
    )
    (RESULTS / f"results{suffix}.md").write_text(to_markdown(rows, info, started))
    print(to_markdown(rows, info, started))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
