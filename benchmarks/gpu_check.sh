#!/usr/bin/env bash
# The GPU check: textrl's tests and GPU benchmarks on a machine with one NVIDIA GPU, in under 10 minutes.
#
#   bash benchmarks/gpu_check.sh prepare      # here, where PyPI is reachable: fills .gpu/ (git-ignored)
#   bash benchmarks/gpu_check.sh run [OUT [STEP ...]]  # on the GPU machine, from the repo root, .gpu/ beside it
#   bash benchmarks/gpu_check.sh --dry-run [OUT]       # the steps here on the CPU, tiny sizes (tests/test_gpu_check.py)
#
# prepare: downloads the wheels the GPU image may lack (Python 3.12, manylinux x86-64, no dependencies
#   fetched: the list below names each one), and writes the configs and tokenizers of SmolLM2-135M-Instruct
#   and SmolLM2-1.7B shapes (no weights: the checks use random weights of real shapes; they need the
#   offline SmolLM2 once here, for its tokenizer). Everything goes under .gpu/ (about 20 MB).
# run: installs those wheels and textrl (editable, no index), then, each step under its own time limit,
#   1. the environment (GPU, driver, versions);
#   2. tests: the test suite on CUDA (`device: auto` picks the GPU; TEXTRL_TEST_DEVICE=cuda puts the decoder
#      tests' models on it, so the compiled step is checked against the reference loop with CUDA graphs, also
#      through continuous batching's admits and compactions), less what cannot run on one GPU
#      without the offline models or bitsandbytes: tests/test_distributed.py (2-process launches),
#      tests/test_golden.py (recorded on CPU), the five tests that load SmolLM2/MiniLM weights, and QLoRA;
#   3. decoders: benchmarks/fast_rollouts.py on cuda in bf16 (each sampling.decoder, the compiled one with
#      CUDA graphs, vs `generate` and its static-cache mode; Qwen2-0.5B and 1.5B shapes, batch 64 and 256,
#      256 new tokens; the shared-prefix prefill ratio; a decode step after 512-token prompts with the cache appended in
#      place vs concatenated as DynamicLayer does); logged into rollout.log;
#      continuous: the same script's variable-length runs (Qwen2-0.5B shape, 128 completions of at most 256
#      tokens, EOS forced at a rate of 0.0035 per step): generate, the compiled decoder in batches of 64, and
#      continuous batching through 64 slots with the dynamic and the compiled decoder; logged into rollout.log;
#      multi_turn: benchmarks/multi_turn_rollout.py on cuda (a 4-turn chat rollout vs a single-turn rollout
#      of as many response columns, random weights of the 135M shape); logged into rollout.log;
#      rollout: benchmarks/rollout_vs_generate.py on cuda in bf16 (textrl's env rollout with the sequence
#      reference pass vs `generate` + reference forward, random weights of the 135M and 1.7B shapes);
#      kl_bias: benchmarks/bf16_kl.py on cuda (does sampling in bf16 bias the k1 KL? policy = reference, random
#      weights of the Qwen2-0.5B shape, fp32 then bf16, the decoder `auto` picks); logged into rollout.log;
#   4. train_lora, train_full: `textrl train` end to end on cuda (random-weight 135M shape, LoRA r16; then
#      full fine-tuning with bf16 autocast): seconds per update, tokens/s, peak GPU memory (OUT/figures.md);
#      train_lora_1.7b: LoRA on the 1.7B shape (the four models of RLHF in one copy);
#      train_multi_turn: `textrl train --env textrl/GuessNumber-v0` (a multi-turn game, its preset) on the
#      135M shape: 3 updates and the held-out games before and after;
#      train_slots: train_lora's run with continuous batching (`--slots`, half the rows: each rollout's
#      completions through half as many env rows and KV-cache rows; `device: auto`'s compiled decoder);
#   5. ppo_vs_trl: benchmarks/ppo_vs_trl.py on cuda (textrl PPO vs TRL's PPOTrainer, same random weights);
#   and writes OUT/summary.md (OUT defaults to $OUT, else gpu_check_out/). STEP names pick steps (default:
#   tests decoders train_lora, about 9 minutes; continuous, multi_turn, rollout, kl_bias, train_full, ppo_vs_trl,
#   train_lora_1.7b, train_multi_turn and train_slots run only when named: each is 1-2 minutes more). The tests read the SmolLM2 tokenizer from .gpu (TEXTRL_TEST_SMOLLM2_TOKENIZER).
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
GPU_DIR=.gpu
# Wheels the GPU image lacks (or has at another version than the one textrl is tested with).
WHEELS=(gymnasium==1.4.0 farama-notifications==0.0.4 transformers==5.24.0 trl==1.12.0 datasets==5.2.0
        dill==0.4.1 multiprocess==0.70.19)

shapes() {  # shapes PYTHON: configs and tokenizers of the checked shapes under $GPU_DIR (no weights)
  "$1" - "$GPU_DIR" <<'EOF'
import json, shutil, sys
from pathlib import Path
from textrl.lm.models import resolve_model_path

src, out = Path(resolve_model_path("smollm2-135m-instruct")), Path(sys.argv[1])
qwen = dict(vocab_size=151936, tie_word_embeddings=True, attention_bias=True,
            rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})  # Qwen2's (Llama layout + qkv bias)
for name, change in {"smollm2-135m": {}, "smollm2-1.7b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, head_dim=64, rope_parameters={"rope_theta": 130000.0, "rope_type": "default"}),
        "qwen2-0.5b-shape": dict(qwen, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, head_dim=64),
        "qwen2-1.5b-shape": dict(qwen, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, head_dim=128),
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=2 * 49152)}.items():  # the dry run's
    # (the Qwen2 shapes have 151936 logits for the 49152 tokens of SmolLM2's tokenizer, which the checks use, and
    # random weights sample every id alike: the envs take the ids past the tokenizer's as actions that decode to
    # nothing, as for a real Qwen2 (151665 tokens). Half the tiny shape's ids are such, so the dry run meets them too.)
    dst = out / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    config = json.loads((dst / "config.json").read_text())
    config.update(change)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
print("shapes:", ", ".join(sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "whl")))
EOF
}

prepare() {
  set -e
  grep -qxF "/$GPU_DIR/" .git/info/exclude 2>/dev/null || echo "/$GPU_DIR/" >> .git/info/exclude
  mkdir -p "$GPU_DIR/whl"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$GPU_DIR/whl" "${WHEELS[@]}"
  shapes "${PYTHON:-.venv/bin/python}"
  du -sh "$GPU_DIR"
}

step() {  # step NAME SECONDS CMD...: run under a time limit, log to OUT/NAME.log, note the outcome
  local name="$1" limit="$2"; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local start=$SECONDS log="$OUT/$name.log"
  [[ $name == train_* ]] && log="$OUT/train.log"  # one file for the train runs: 8 files come back at most
  [[ $name == multi_turn || $name == decoders || $name == continuous || $name == kl_bias ]] && log="$OUT/rollout.log"
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  tail -n 12 "$log"
  echo "| $name | $rc | $((SECONDS - start)) s |" >> "$OUT/steps.md"
  return $rc
}

run() {
  OUT="${1:-${OUT:-gpu_check_out}}"
  shift || true
  STEPS="${*:-tests decoders train_lora}"
  local runs=/tmp/gpu_check_runs  # run directories stay on the machine; OUT gets 8 small files
  mkdir -p "$OUT"; rm -rf "$runs"
  figures() {  # the figures of run $1 (also of a run stopped at its limit) go into steps.md at once
    [[ -d "$runs/$1" ]] && $py benchmarks/run_figures.py "$runs/$1" | tail -n 1 >> "$OUT/figures.md"
  }
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  export PIP_DISABLE_PIP_VERSION_CHECK=1 TRANSFORMERS_VERBOSITY=error
  # GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1: a dry run of the steps on a machine without a GPU (CI-sized)
  local py=python3 shape135="$GPU_DIR/smollm2-135m" shape17="$GPU_DIR/smollm2-1.7b" dev="${GPU_CHECK_DEVICE:-cuda}"
  # (the decoder tests first: within the limit they run whatever else does not; pytest collects a file once)
  local rows=64 tokens=64 lengths=(${GPU_CHECK_LENGTHS:-128 256}) dtype=bf16 xdist=(-n 12) small_env=""
  local tests=(tests/test_fast_decoding.py tests/test_continuous_batching.py tests/test_generate.py tests)
  local turn=(--turns 4 --turn-tokens 16) qwen05="$GPU_DIR/qwen2-0.5b-shape" qwen15="$GPU_DIR/qwen2-1.5b-shape"
  local updates=6 game_updates=3 kl_model="$GPU_DIR/qwen2-0.5b-shape"
  # (--variable 0: random weights almost never sample EOS, so their lengths do not vary)
  local decoders=(--batch 64 256 --lengths 256 --variable 0 --growing 512 --models "random:$qwen05" "random:$qwen15")
  # continuous batching: EOS forced at a rate whose mean length over the limit (0.6) is about the default task's
  local continuous=(--batch 64 --variable 256 --episodes 128 --eos-rate 0.0035 --models "random:$qwen05" --decoders
                    --baselines --variable-runs generate compiled continuous continuous-compiled)
  if [[ -n "${GPU_CHECK_SMALL:-}" ]]; then
    decoders=(--batch 4 --lengths 8 --variable 8 --episodes 8 --growing 16 --models "random:$GPU_DIR/tiny" --decoders dynamic static
              --baselines generate --variable-runs generate dynamic kept static continuous continuous-static)
    continuous=(--batch 4 --variable 8 --episodes 8 --eos-rate 0.2 --models "random:$GPU_DIR/tiny" --decoders
                --baselines --variable-runs generate continuous-static)
    shape135="$GPU_DIR/tiny"; kl_model="$GPU_DIR/tiny"
    rows=4; tokens=8; lengths=(8); tests=(tests/test_generate.py); shape17="$shape135"; dtype=fp32; xdist=()
    turn=(--turns 2 --turn-tokens 4); updates=3; game_updates=2
    small_env=", eval_prompts: ['Say hi.', 'Name a colour.']"
  fi
  [[ -n "${GPU_CHECK_SMALL:-}" ]] && py="${PYTHON:-.venv/bin/python}"
  echo "| step | exit code | seconds |" > "$OUT/steps.md"; echo "|---|---|---|" >> "$OUT/steps.md"
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if [[ -z "${GPU_CHECK_SMALL:-}" ]]; then
      $py -m pip install -q --no-index --no-deps --no-compile "$GPU_DIR"/whl/*.whl
      $py -m pip install -q --no-index --no-deps --no-build-isolation -e .
    fi
    $py -c "import torch, transformers, accelerate, peft, gymnasium, textrl
print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__,
      '| gymnasium', gymnasium.__version__)
print('GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  } > "$OUT/env.log" 2>&1
  cat "$OUT/env.log"

  $py -c "import xdist" 2>/dev/null || xdist=()
  # (the decoder tests first, TEXTRL_TEST_FIRST: a suite cut short by the limit has run them)
  TEXTRL_TEST_FIRST="tests/test_fast_decoding.py tests/test_continuous_batching.py tests/test_generate.py" \
  TEXTRL_TEST_SMOLLM2_TOKENIZER="$shape135" TEXTRL_TEST_DEVICE="$dev" step tests 240 $py -m pytest -v --tb=short --maxfail=20 -p no:cacheprovider -W ignore "${xdist[@]}" --durations=15 \
    --ignore=tests/test_distributed.py --ignore=tests/test_golden.py \
    --deselect tests/test_scorers_models.py::test_smollm2_offline_cached_logprobs_match_parallel_forward \
    --deselect tests/test_scorers_models.py::test_hf_reward_model_scorer_has_its_own_tokenizer_and_is_batch_invariant \
    --deselect tests/test_reward_model.py::test_minilm_reward_model_learns_a_preference_and_plugs_into_the_env \
    --deselect tests/test_reward_model.py::test_train_rm_cli_says_how_many_rows_it_skipped \
    --deselect tests/test_reward_model.py::test_lora_reward_model_is_merged_into_a_plain_checkpoint \
    --ignore=tests/test_quant.py \
    "${tests[@]}"

  step multi_turn 75 $py benchmarks/multi_turn_rollout.py --device "$dev" --dtype $dtype --batch $rows \
    "${turn[@]}" --reps 2 --model "random:$shape135"

  step decoders 240 $py benchmarks/fast_rollouts.py --device "$dev" --dtype $dtype --reps 1 --tokenizer "$shape135" \
    "${decoders[@]}"

  step continuous 200 $py benchmarks/fast_rollouts.py --device "$dev" --dtype $dtype --reps 1 --tokenizer "$shape135" \
    "${continuous[@]}"

  step rollout 100 $py benchmarks/rollout_vs_generate.py --device "$dev" --dtype $dtype --batch $rows \
    --lengths "${lengths[@]}" --reps 1 --reference-pass sequence --models "random:$shape135" "random:$shape17"

  step kl_bias 90 $py benchmarks/bf16_kl.py --device "$dev" --model "random:$kl_model" --tokenizer "$shape135" \
    --rows $rows --tokens $tokens --reps 2

  # random-weight checkpoints of the shapes for `textrl train` (it loads models with from_pretrained)
  save_random() {
    $py - "$1" "$2" <<'EOF' >> "$OUT/env.log" 2>&1
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
model.save_pretrained(sys.argv[2]); AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
EOF
  }
  if [[ " $STEPS " == *" train_lora "* || " $STEPS " == *" train_full "* || " $STEPS " == *" train_multi_turn "* ||
        " $STEPS " == *" train_slots "* ]]; then
    save_random "$shape135" /tmp/smollm2-random
  fi
  if [[ " $STEPS " == *" train_lora_1.7b "* ]]; then save_random "$shape17" /tmp/smollm2-1.7b-random; fi
  local train=($py -m textrl train --env textrl/Cheerful-v0 --model /tmp/smollm2-random --device "$dev"
               --env-kwargs "{scorer: 'textrl.envs.toy:TargetTokenScorer', max_new_tokens: $tokens$small_env}"
               --num-envs $rows --total-steps $((rows * tokens * updates)) --checkpoint-every 3 --eval-generations 1)
  # the default experiment's LoRA (r16 on the attention projections; the reference = adapters off)
  local lora=(--lora-r 16 --lora-alpha 32 --lora-targets q_proj,k_proj,v_proj,o_proj)
  step train_lora 75 "${train[@]}" "${lora[@]}" --output-dir "$runs/lora"
  figures lora
  step train_full 75 "${train[@]}" --bf16 $([[ $dtype == bf16 ]] && echo true || echo false) \
    --learning-rate 1e-5 --output-dir "$runs/full"
  figures full
  step train_slots 75 "${train[@]}" "${lora[@]}" --slots $((rows / 2)) --checkpoint-every 0 --output-dir "$runs/slots"
  figures slots
  train[7]=/tmp/smollm2-1.7b-random
  step train_lora_1.7b 120 "${train[@]}" "${lora[@]}" --checkpoint-every 0 --output-dir "$runs/lora_1.7b"
  figures lora_1.7b
  # a multi-turn game end to end (GuessNumber's preset: LoRA r16, 80 response columns), 3 updates
  step train_multi_turn 90 $py -m textrl train --env textrl/GuessNumber-v0 --model /tmp/smollm2-random \
    --device "$dev" --num-envs $rows --total-steps $((rows * 80 * game_updates)) --checkpoint-every 0 --output-dir "$runs/multi_turn"
  figures multi_turn

  step ppo_vs_trl 110 $py benchmarks/ppo_vs_trl.py --device "$dev" --sizes "random:$shape135" --batch $rows \
    --response $tokens --updates 6

  {
    echo "# textrl GPU check"; echo; echo '```'; cat "$OUT/env.log"; echo '```'; echo
    cat "$OUT/steps.md"; echo
    if [[ -f "$OUT/tests.log" ]]; then
      echo "## Tests on CUDA"; echo '```'; grep -E "^(FAILED|ERROR) |\] (FAILED|ERROR) |^[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s" "$OUT/tests.log"; echo '```'
    fi
    [[ -f "$OUT/rollout.log" ]] && { echo "## Rollouts: textrl's decoders and generate ($dtype)"; grep -E "^\||^prefill|^step bound|^variable lengths|fell back" "$OUT/rollout.log"; echo; }
    [[ -f "$OUT/rollout.log" ]] && { echo "## Multi-turn vs single-turn rollout ($dtype, batch $rows)"
      grep -E "^(model|\(a\)|\(b\))" "$OUT/rollout.log"; echo; }
    [[ -f "$OUT/rollout.log" ]] && { echo "## Sampling in bf16 and the KL (policy = reference: the true KL is 0)"
      grep -E "^\| (dtype|fp32|bf16) \|" "$OUT/rollout.log"; echo; }
    echo "## textrl train on $dev (random-weight SmolLM2 shapes, $rows rows x $tokens tokens; lora: r16, fp32;"
    echo "full: full fine-tuning with bf16 autocast; PPO defaults: 4 epochs x 4 minibatches)"
    echo "| run | updates | collect (s, median) | update (s, median) | agent tokens/s | peak GPU MiB |"
    echo "|---|---|---|---|---|---|"; cat "$OUT/figures.md" 2>/dev/null; echo
    [[ -f "$OUT/ppo_vs_trl.log" ]] && { echo "## PPO vs TRL on $dev"; grep -E "^\||x faster|ratio" "$OUT/ppo_vs_trl.log"; }
  } > "$OUT/summary.md" 2>&1
  cat "$OUT/summary.md"
}

dry_run() {  # the steps on this machine's CPU, tiny sizes, the shapes in a temporary folder (a test runs it): all but
  # ppo_vs_trl (trl is not a dependency here) and train_lora_1.7b (the dry run's shapes are one tiny model, so it
  # would repeat train_lora)
  GPU_DIR="$(mktemp -d)"
  shapes "${PYTHON:-.venv/bin/python}" > /dev/null
  GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 run "${1:-${OUT:-gpu_check_out}}" tests decoders continuous multi_turn rollout \
    kl_bias train_lora train_full train_multi_turn train_slots ${GPU_CHECK_DRY_EXTRA:-}
  rm -rf "$GPU_DIR"
}

case "$mode" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  --dry-run|dry-run) shift; dry_run "$@" ;;
  *) echo "usage: bash benchmarks/gpu_check.sh {prepare|run [OUT [STEP ...]]|--dry-run [OUT]}" >&2; exit 2 ;;
esac
