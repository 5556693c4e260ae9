#!/usr/bin/env bash
# A CI step: quantize a model, hold it to a quality budget, and keep the artifact only if it
# passes. The step's exit code is qforge's (`qforge --help`): 6 budget exceeded, 3 the job
# failed, 4 timed out, 5 server unreachable or 5xx (retry the step), 2 bad input.
#
# Through a server when QFORGE_SERVER is set (QFORGE_API_KEY too, if it needs one);
# otherwise on this machine with `qforge quantize`, no server.
#
#   MODEL=bundled:smollm2-135m RECIPE=w4a16-gptq-g64 MAX_PERPLEXITY_RATIO=1.10 bash examples/ci_quantize.sh
set -euo pipefail

MODEL=${MODEL:-bundled:smollm2-135m}
RECIPE=${RECIPE:-w4a16-gptq-g64}           # a preset name or a recipe file
MAX_PERPLEXITY_RATIO=${MAX_PERPLEXITY_RATIO:-1.10}  # quantized / float perplexity
OUT=${OUT:-quantized}
EVAL_TOKENS=${EVAL_TOKENS:-}               # empty: the default evaluation (16,384 tokens)
TIMEOUT=${TIMEOUT:-7200}                   # seconds to wait for the job

options=()
if [ -n "$EVAL_TOKENS" ]; then
  options+=(--perplexity-tokens "$EVAL_TOKENS")
fi
budget="perplexity_ratio<=$MAX_PERPLEXITY_RATIO"

if [ -n "${QFORGE_SERVER:-}" ]; then
  # One key per pipeline run, model and recipe: a retried step (or a re-run of this one with
  # another budget) finds its job instead of quantizing again.
  run=${QFORGE_RUN_ID:-${GITHUB_RUN_ID:-${CI_PIPELINE_ID:-}}}
  key=()
  if [ -n "$run" ]; then
    key=(--idempotency-key "ci-$run-$MODEL-$RECIPE")
  fi
  job=$(qforge submit "$MODEL" --recipe "$RECIPE" ${options[@]+"${options[@]}"} ${key[@]+"${key[@]}"} \
        --wait --timeout "$TIMEOUT")
  qforge report "$job" --check "$budget"
  mkdir -p "$OUT"
  qforge download "$job" --out "$OUT/"
else
  qforge quantize "$MODEL" --recipe "$RECIPE" ${options[@]+"${options[@]}"} --out "$OUT"
  qforge report "$OUT" --check "$budget"
fi
