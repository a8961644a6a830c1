"""Merge hybrid-bench reports of one device (e.g. patterns run in separate calls) into one report, with the
ratios against the baseline recomputed over all patterns.

    python scripts/merge_bench.py a.json b.json --baseline Ax12 --out merged.json
"""

from __future__ import annotations

import argparse
import json

from hybrid.bench.compare import against_baseline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--baseline")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    reports = [json.load(open(p)) for p in args.reports]
    devices = {r["device_name"] for r in reports}
    if len(devices) > 1:
        raise SystemExit(f"reports come from different devices {sorted(devices)}: their timings do not compare")
    merged = {**reports[0], "patterns": [p for r in reports for p in r["patterns"]]}
    merged["config"] = {**reports[0]["config"], "patterns": [p["pattern"] for p in merged["patterns"]],
                        "baseline": args.baseline}
    merged["versus_baseline"] = against_baseline(merged, args.baseline)
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)


if __name__ == "__main__":
    main()
