"""`make bench`: run every bench/bench_*.py in its own process (so peak-memory numbers are per
benchmark), then print a summary of the targets. Pass --quick to check the scripts only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    args = sys.argv[1:]
    only = [a for a in args if not a.startswith("-")]
    flags = [a for a in args if a.startswith("-")]
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(o in s.stem for o in only)]
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem}", flush=True)
        code = subprocess.call([sys.executable, str(script), *flags])
        if code != 0:
            failed.append(script.stem)
    print("\n=== summary")
    for path in sorted((HERE / "results").glob("*.json")):
        result = json.loads(path.read_text())
        for t in result.get("targets", []):
            mark = "ok " if t["ok"] else "NO "
            print(f"{mark} {result['name']}: {t['target']}: {t['measured']:.4g} (need {t['required']})")
    if failed:
        print(f"benchmark scripts that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
