#!/usr/bin/env bash
# The GPU measurements of this project, each sized to finish within a 10-minute device call.
#
#   FOCUSDLLM_COMMIT=$(git rev-parse --short HEAD) OUT=/path/to/out bash bench/gpu_jobs.sh <job>
#
# Jobs: tests | e2e-4k-16k | e2e-32k | e2e-64k | e2e-dream-32k | ops | fidelity | ablation | tail | stage1-variants |
#       recipe, then recipe-collect (the whole training recipe across two calls)
# Pass FOCUSDLLM_COMMIT from the checkout: a copied tree's .git can be stale, and the JSON records the commit.
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
: "${FOCUSDLLM_COMMIT:?set FOCUSDLLM_COMMIT to the commit of the checkout}"
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FOCUSDLLM_COMMIT
quiet() { grep -v "Warn\|warn" || true; }
bench() { python -m focusdllm.bench --gen-length 256 --block-length 32 --steps 128 --device cuda "$@"; }
case "${1:-}" in
  tests)  # hypothesis on CUDA compiles many shapes: give it the whole call
    timeout 540 python -m pytest -q -p no:cacheprovider tests/test_attention_flex_gpu.py \
      tests/test_generate_backends.py tests/test_sparse_prefill.py 2>&1 | quiet > "$OUT/gpu_tests.log" ;;
  e2e-4k-16k)
    bench --model llada-8b --contexts 4096 8192 16384 --max-seconds 480 --out "$OUT/e2e_4k-16k.json" 2>&1 | quiet > "$OUT/e2e_4k-16k.log" ;;
  e2e-32k)  # every mode at 32K in one run, with the step profile
    bench --model llada-8b --contexts 32768 --modes vanilla fastdllm-dual fastdllm-prefix focus focus+reuse focus+reuse+slim \
      focus+reuse+sparse focus+reuse+slim+sparse --profile \
      --profile-modes fastdllm-dual focus focus+reuse+slim+sparse --max-seconds 420 --out "$OUT/e2e_32k.json" 2>&1 | quiet > "$OUT/e2e_32k.log" ;;
  e2e-64k)
    bench --model llada-8b --contexts 65536 --modes vanilla fastdllm-dual focus focus+reuse+sparse \
      focus+reuse+slim+sparse --max-seconds 400 --out "$OUT/e2e_64k.json" 2>&1 | quiet > "$OUT/e2e_64k.log" ;;
  e2e-dream-32k)
    bench --model dream-7b --contexts 32768 --modes vanilla fastdllm-dual focus focus+reuse focus+reuse+sparse \
      focus+reuse+slim+sparse --max-seconds 420 --out "$OUT/e2e_dream_32k.json" 2>&1 | quiet > "$OUT/e2e_dream_32k.log" ;;
  ops)
    timeout 540 python -m pytest -q bench/bench_attention_ops.py -k "q32 and (0.1 or dense)" \
      --benchmark-json="$OUT/attention_ops.json" 2>&1 | quiet | tail -20 > "$OUT/attention_ops.log" ;;
  fidelity)
    timeout 560 python -m focusdllm.evaluate --tasks passkey multikey spancopy --lengths 2048 4096 8192 16384 \
      --modes dense fastdllm focus focus-flex focus-fast focus-fast-sparse focus-fast-slim-sparse bad \
      --out "$OUT/fidelity.json" --heatmap "$OUT/fidelity.png" 2>&1 | quiet > "$OUT/fidelity.log" ;;
  ablation)  # one Focus knob at a time on the shipped model (bench/ablate_focus.py)
    for L in 8192 4096; do
      timeout 250 python bench/ablate_focus.py --length $L --tasks passkey multikey spancopy --device cuda \
        --dtype bfloat16 --out "$OUT/ablation_$((L / 1024))k.json" 2>&1 | quiet > "$OUT/ablation_$((L / 1024))k.log"
    done ;;
  tail)  # the presets' prompt-tail refresh against reuse without it, and half-depth pruning: 32K speed, fidelity
    bench --model llada-8b --contexts 32768 --modes vanilla fastdllm-dual focus+reuse+sparse focus+reuse+sparse+notail \
      focus+reuse+slim+sparse focus+reuse+slim@16+sparse --max-seconds 200 --out "$OUT/e2e_32k_tail.json" 2>&1 \
      | quiet > "$OUT/e2e_32k_tail.log"
    timeout 330 python -m focusdllm.evaluate --tasks passkey multikey spancopy --lengths 2048 4096 8192 16384 \
      --modes dense focus-fast focus-fast-sparse focus-fast-slim-sparse focus-fast-slim-sparse@2 \
      --out "$OUT/fidelity_tail.json" 2>&1 | quiet > "$OUT/fidelity_tail.log" ;;
  stage1-variants)  # stage 1's first 30 % at 320-430 tokens, data variants x seeds side by side on one GPU: does
    # multikey's key matching form (bench/stage1_variants.py reads the logs). STAGE1_RUNS: variant:seed pairs
    declare -A flags=([base]="" [keyed]="--aux-keyed 0.3")
    rm -rf /tmp/s1  # a warm machine may hold an earlier call's runs
    for run in ${STAGE1_RUNS:-base:1 base:2 keyed:1 keyed:2}; do
      v=${run%%:*} s=${run#*:}
      # shellcheck disable=SC2086
      timeout "${STAGE1_SECS:-470}" python bench/train_tiny.py --preset h100 --out "/tmp/s1/${v}_s$s" --seed "$s" \
        --max-len 1024 --end-at "${STAGE1_END:-0.3}" --workers 2 --save-every 0 --eval-lengths 448 --eval-n 32 \
        --suite-lengths 1024 --suite-per-depth 2 ${flags[$v]} > "/tmp/s1_${v}_s$s.out" 2>&1 &
    done
    wait
    python bench/stage1_variants.py /tmp/s1 --out "$OUT/stage1_variants.json"
    for d in /tmp/s1/*/; do cp "$d/train_log.jsonl" "$OUT/train_log_s1_$(basename "$d").jsonl" || true; done ;;
  recipe)  # the whole recipe in one process (~13-14 min and the suite eval: longer than one call), so it runs detached
    # (setsid) on the machine; call `recipe-collect` next, within the machine's warm time. RECIPE_FLAGS go to every stage;
    # RECIPE_ARGS replace the suite flags of train_recipe.py (a CPU check of this job: --stages smoke,smoke)
    mkdir -p /root/recipe
    # shellcheck disable=SC2086
    setsid nohup python bench/train_recipe.py --out /root/recipe/model ${RECIPE_ARGS:---suite-lengths 2048,4096,8192,16384 \
      --suite-per-depth 2,2} ${RECIPE_FLAGS:+-- $RECIPE_FLAGS} > /root/recipe/recipe.log 2>&1 < /dev/null &
    sleep "${RECIPE_WAIT:-570}"; tail -3 /root/recipe/recipe.log ;;
  recipe-collect)  # waits (up to ~9.5 min) for the detached recipe's verdict, then brings back its logs and weights
    for _ in $(seq 57); do [ -f /root/recipe/model/recipe.json ] && break; sleep 10; done
    m=/root/recipe/model
    cp /root/recipe/recipe.log "$m/recipe.json" "$m/eval.json" "$m/config.json" "$m/model.safetensors" "$OUT/" || true
    for st in stage1 stage2; do cp "$m/$st/train_log.jsonl" "$OUT/train_log_$st.jsonl" || true; done
    cp "$m/train_log.jsonl" "$OUT/train_log_stage3.jsonl" || true
    tail -3 /root/recipe/recipe.log ;;
  *) echo "usage: bash bench/gpu_jobs.sh tests|e2e-4k-16k|e2e-32k|e2e-64k|e2e-dream-32k|ops|fidelity|ablation|tail|stage1-variants|recipe|recipe-collect" >&2; exit 2 ;;
esac
