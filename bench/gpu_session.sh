#!/usr/bin/env bash
# One GPU session, prepared ahead: install the carried wheels, then run the benchmark groups in priority order,
# each with its own time limit, stopping before the session deadline. Everything lands under $OUT (JSON + logs).
#
#   bash bench/gpu_session.sh            # on the GPU host, from the repo root, with .whl/ beside it
#   bash bench/gpu_session.sh --tiny     # the same groups on the tiny shape on CPU: checks the script only
#   ONLY=lora bash bench/gpu_session.sh  # just the named groups (space-separated), in the order below
#
# Groups, in priority order (the figures still pending first): lora (megallava LoRA-64 / QLoRA-64 vs its own full
# fine-tuning and HF + PEFT LoRA-64 / QLoRA-64 on bitsandbytes; issue 10's targets), headline (megallava fused and
# unfused vs HF's two precision policies), profile (where the GPU time goes), memory (bf16 states, recompute), packed
# (packing's per-token cost), ablation (one fused kernel off at a time), smoke (the real trainer CLI on the GPU with a
# checkpoint resume). The headline, profile, memory, packed and ablation figures are in bench/README.md already.
set -uo pipefail
TINY=""; [ "${1:-}" = "--tiny" ] && TINY="--tiny"
if [ -z "$TINY" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
    && export PYTHONPATH=$PWD/.site:$PWD || exit 1
fi
PY=${PY:-python3}
OUT=${OUT:-/tmp/megallava_gpu_session}
DEADLINE=${DEADLINE:-400}   # seconds for all groups; a group starts only if its limit fits before the deadline
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/megallava_inductor}
{ date; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; $PY -c "import torch, transformers, megatron.core as m; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'megatron-core', m.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

group() {  # group NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  [[ " ${ONLY:-lora headline profile memory packed ablation smoke} " == *" $name "* ]] || return 0
  if (( SECONDS + limit > DEADLINE )); then
    echo "== $name: skipped (${SECONDS}s used, limit ${limit}s, deadline ${DEADLINE}s)" | tee -a "$OUT/summary.txt"
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  grep -E "^\[|tokens/s|ratios|target|4-bit base|SKIPPED|packed_per_token|profile ms|FAILED|Error|error" \
    "$OUT/$name.log" | tail -40 \
    | tee -a "$OUT/summary.txt"
}

B="$PY bench/train_vs_hf.py $TINY"
# 5 systems of ~2B parameters, each built, warmed up (3 iterations, compiling) and timed (10): ~40 s each on an H200
group lora 240 $B --systems megallava,megallava-lora64,megallava-qlora64,hf-peft-lora64,hf-peft-qlora64 \
  --out "$OUT/lora.json"
group headline 170 $B --systems ${HEADLINE:-megallava-unfused,megallava,hf-pure-bf16,hf-bf16-master} --out "$OUT/headline.json"
group profile 80 $B --profile --warmup 2 --iters 3 --systems ${PROFILED:-megallava-unfused,megallava,hf-pure-bf16} \
  --out "$OUT/profile.json"
group memory 70 $B --systems megallava-bf16-states,megallava-bf16-states-recompute,megallava-recompute \
  --out "$OUT/memory.json"
group packed 80 $B --systems megallava-packed,megallava-halves --out "$OUT/packed.json"
group ablation 90 $B --systems megallava-no-rmsnorm,megallava-no-swiglu,megallava-no-rope,megallava-no-ce,megallava-no-adam \
  --out "$OUT/ablation.json"

smoke() {  # the trainer CLI on this device: 4 iterations vs 2 + resume 2, all fused kernels on (auto)
  local d="${SMOKE_DIR:-$OUT/smoke}" cfg=examples/configs/tiny_cpu.yaml
  local common="parallel.tp=1 parallel.pp=1 train.precision=auto train.iters=4 train.lr_warmup_fraction=0"
  rm -rf "$d" && mkdir -p "$d"
  $PY -m megallava.train --config $cfg $common train.run_dir=$d/full || return 1
  $PY -m megallava.train --config $cfg $common train.run_dir=$d/a train.exit_interval=2 checkpoint.dir=$d/ck || return 1
  $PY -m megallava.train --config $cfg $common train.run_dir=$d/b checkpoint.dir=$d/ck checkpoint.load=$d/ck || return 1
  $PY - "$d" <<'EOF'
import json, sys
d = sys.argv[1]
read = lambda run: [json.loads(l) for l in open(f"{d}/{run}/metrics.jsonl")]
full, a, b = read("full"), read("a"), read("b")
got = [r["loss"] for r in a + b]
want = [r["loss"] for r in full]
print("smoke losses full", want, "interrupted+resumed", got, "bitwise equal:", got == want)
sys.exit(0 if got == want else 1)
EOF
}
export -f smoke; export PY OUT
group smoke 120 bash -c smoke
echo "done in ${SECONDS}s" | tee -a "$OUT/summary.txt"
