#!/usr/bin/env bash
# Build sdist + wheel, check them, install the wheel into a fresh venv holding only torch, and
# run the README example there: what a PyPI user gets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

"$PY" -m build --sdist --wheel --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 || {
  cat "$OUT/build.log"; exit 1; }
"$PY" -m twine check --strict "$OUT"/dist/*
wheel=$(ls "$OUT"/dist/*.whl)
echo "wheel: $(basename "$wheel")"
# The wheel holds the package only: no tests, examples, benchmarks, docs or data.
"$PY" - "$wheel" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if not (n.startswith("implicitlayers/") or ".dist-info/" in n)]
assert not bad, f"unexpected files in the wheel: {bad[:10]}"
assert "implicitlayers/py.typed" in names, "py.typed missing from the wheel"
print(f"wheel contents ok: {len(names)} files, py.typed included")
PYEOF

python3 -m venv "$OUT/venv"
"$OUT/venv/bin/python" -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
"$OUT/venv/bin/python" -m pip install -q "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
cd "$OUT"  # away from the source tree, so the installed wheel is what imports
"$OUT/venv/bin/python" - "$OLDPWD/README.md" <<'PYEOF'
import re, sys
from importlib.metadata import version
from importlib.resources import files
import implicitlayers as il
assert il.__version__ == version("implicitlayers"), (il.__version__, version("implicitlayers"))
assert files("implicitlayers").joinpath("py.typed").is_file()
assert "site-packages" in il.__file__, il.__file__
text = open(sys.argv[1]).read()
code = re.search(r"<!-- readme-example.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
exec(code, {})
print(f"clean venv: implicitlayers {il.__version__} imports from {il.__file__}; README example ran")
PYEOF
