#!/usr/bin/env bash
# Run the adapter's tests on the oldest transformers pyproject.toml accepts (the venv keeps the newest), so the
# declared range is tested at both ends. The old release goes into a side directory put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
SIDE=".venv/transformers-$OLDEST"
test -d "$SIDE/transformers" || .venv/bin/pip install -q --no-deps --target "$SIDE" "transformers==$OLDEST"
PYTHONPATH="$SIDE" .venv/bin/python -c "import transformers, sys; v = transformers.__version__; print('transformers', v); from packaging.version import Version as V; sys.exit(V(v) != V('$OLDEST'))"
PYTHONPATH="$SIDE" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_backbones.py tests/test_technique_matrix.py tests/test_session.py
