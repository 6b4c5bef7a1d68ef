"""Summarise the last ``mutmut run``: counts, kill rates, and survivors nobody has explained.

Run from the repository root after ``mutmut run`` (``make mutation`` does both). Survivors
listed in ``mutation/README.md`` (a bullet starting with the mutant's name in backticks) are
equivalent mutants, each with its reason there; any other survivor, or any mutant without
tests, is reported by name and makes this script exit with status 1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
LINE = re.compile(r"^\s*(\S+__mutmut_\d+): (.+?)\s*$")
LISTED = re.compile(r"^- `(\S+__mutmut_\d+)`", re.MULTILINE)


def results() -> dict[str, str]:
    """Every mutant's status, from ``mutmut results --all true``."""
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    out = subprocess.run(
        [mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    return {m[1]: m[2] for m in map(LINE.match, out.splitlines()) if m}


def main() -> int:
    status = results()
    if not status:
        print("No mutmut results here: run `make mutation` (or `mutmut run`) first.")
        return 1
    counts = Counter(status.values())
    equivalent = set(LISTED.findall((HERE / "README.md").read_text()))
    survivors = {name for name, s in status.items() if s == "survived"}
    unexplained = sorted(survivors - equivalent)
    untested = sorted(name for name, s in status.items() if s == "no tests")
    stale = sorted(equivalent - survivors)
    made = len(status)
    killed = counts["killed"] + counts["timeout"]
    explained = len(survivors & equivalent)
    print(f"mutants made      {made}")
    print(f"killed            {killed} (timeouts {counts['timeout']})")
    print(f"survived          {len(survivors)} ({explained} equivalent, listed in README.md)")
    for other in sorted(set(counts) - {"killed", "timeout", "survived"}):
        print(f"{other:<17} {counts[other]}")
    print(f"kill rate         {100 * killed / made:.1f}% of all mutants")
    if made > explained:
        print(
            f"                  {100 * killed / (made - explained):.1f}% of the non-equivalent ones"
        )
    for title, names in (
        ("Survivors not listed as equivalent in mutation/README.md", unexplained),
        ("Mutants no selected test reaches", untested),
        ("Listed as equivalent but no longer surviving (renumbered? update the list)", stale),
    ):
        if names:
            print(f"\n{title}:")
            print("\n".join(f"  {name}" for name in names))
    return 1 if unexplained or untested else 0


if __name__ == "__main__":
    sys.exit(main())
