#!/usr/bin/env bash
# Check the dependency floors of pyproject.toml: a venv with the oldest supported transformers and peft (the
# rest from the project's .venv, read-only), textrl installed from its wheel, and the core tests run against it
# (not the golden tests: they hold the float results of the versions they were recorded with).
#   bash .ci/floors.sh            (needs PyPI for the two packages; run after `bash run.sh test` made .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"; work="${TMPDIR:-/tmp}/textrl-floors"; rm -rf "$work"; mkdir -p "$work"
base="$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')/bin/python3"
"$base" -m venv "$work/venv"
site="$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/deps.pth"
"$work/venv/bin/python" -m pip install -q "transformers==4.56.2" "peft==0.13.2" "datasets==2.19.2"
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$root"
"$work/venv/bin/python" -m pip install -q --no-deps --force-reinstall "$work"/dist/textrl_gym-*.whl
cd "$root/tests"  # tests/ only on sys.path: textrl comes from the wheel
"$work/venv/bin/python" -c "import transformers, peft, textrl; print('floors:', transformers.__version__, peft.__version__, textrl.__file__)"
HF_HUB_OFFLINE=1 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" \
  test_generate.py test_rollout.py test_text_env.py test_text_ppo.py test_python_api.py test_trainer_api.py \
  test_fast_decoding.py test_continuous_batching.py "$@"
