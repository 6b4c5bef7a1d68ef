"""``python -m benchmarks publish RUN_DIR``: copy a run's report into ``benchmarks/``.

Writes ``benchmarks/RESULTS.md`` from ``RUN_DIR/report.md`` with the plots copied into
``benchmarks/results/`` (small PNGs, linked by relative path) and the run's JSON copied to
``benchmarks/results/results.json``. The hand-written summary between the
``<!-- summary:start -->`` and ``<!-- summary:end -->`` markers of an existing RESULTS.md is
kept, so republishing a new run only replaces the generated part.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- summary:start -->", "<!-- summary:end -->"


def publish(run_dir: Path, results_md: Path = HERE / "RESULTS.md") -> Path:
    """Publish ``run_dir`` to ``results_md``; returns the written path."""
    data = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    if data.get("quick"):
        raise SystemExit(f"{run_dir} is a --quick run; publish a full run")
    folder = results_md.parent / "results"
    folder.mkdir(exist_ok=True)
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for png in sorted(run_dir.glob("*.png")):
        shutil.copyfile(png, folder / png.name)
        report = report.replace(f"]({png.name})", f"](results/{png.name})")
    shutil.copyfile(run_dir / "results.json", folder / "results.json")
    summary = f"{START}\n_No summary yet._\n{END}"
    if results_md.exists():
        match = re.search(
            re.escape(START) + ".*?" + re.escape(END), results_md.read_text(encoding="utf-8"), re.S
        )
        if match:
            summary = match.group(0)
    env = data["environment"]
    header = (
        "# Benchmark results\n\n"
        f"Latest full run: `{data['command']}`, {env['date']} (UTC), device {env['device']} "
        f"({env.get('gpu') or env['cpu']}, {env['cpu_count']} cores, "
        f"{env['torch_threads']} torch thread(s)), torch {env['torch']}, implicitlayers "
        f"{env['implicitlayers']} (commit {env.get('git_commit')}). Raw data: "
        "[results/results.json](results/results.json). Reproduce with "
        "`python -m benchmarks run --suite all --device cpu --out runs/bench`, then "
        "`python -m benchmarks publish runs/bench`.\n\n"
    )
    body = report.split("\n", 1)[1].lstrip()  # drop the report's own title
    body = re.sub(r"^## ", "### ", body, flags=re.M)
    results_md.write_text(header + summary + "\n\n## Full report\n\n" + body, encoding="utf-8")
    return results_md
