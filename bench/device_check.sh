#!/usr/bin/env bash
# The one prepared device check (issue: performance). On a lent GPU machine, from the repo root:
#   make device-wheels                     # here, once: wheels the device image lacks -> .whl/
#   device run: carry [".whl"], command "bash bench/device_check.sh", timeout_s 540
# Installs the carried wheels, runs the GPU tests, then bench/run.py and bench/profile_probe.py on the
# default config and on GPT-2 small (12 layers, 12 heads, 768 wide, 1,024 context, 50,304 vocabulary),
# the probe step's peak GPU memory for GPT-2 (bench/probe_memory.py), the host proxy on the machine's
# CPU (bench/host_proxy.py, to set against the default config's eager probe step on the GPU) and,
# last, what each probe costs in GPT-2's probe run (profile_probe.py --per-probe), logging under
# $OUT. Each part has its own timeout (510 s together, and 60 s for installing the wheels) so a slow part cannot starve the rest;
# were every part to run to its limit (570 s), the run's 540 s would cut the last, least needed one, the per-probe costs.
#
# LENS_CHECK_DEVICE=cpu PATH=.venv/bin:$PATH bash bench/device_check.sh rehearses it on a machine without a GPU: the same
# commands on the CPU, with a small GPT-2-shaped model, one round and longer timeouts (about 2 min on 2
# cores; no direct A/B for the default config and no P3 for GPT-2's, and no CUDA-only path: graphs,
# CUDA memory), so that a broken command shows up before device time is spent on it.
set -uo pipefail
OUT=${OUT:-/tmp/lens-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the machine and the versions open gpu_tests.log (no file of their own: what comes back is limited)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu_tests.log"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu_tests.log"
from importlib.metadata import version
import lightning, torch, transformer_lens
print("torch", torch.__version__, "| lightning", lightning.__version__, "| transformer-lens",
      version("transformer-lens"), "| cuda", torch.cuda.is_available())
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
DEVICE=${LENS_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then  # the rehearsal: small sizes, timeouts x 6
    GPT2='{"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 1024, "vocab_size": 256, "bias": true}'
    S=6 R5=1 R10=1 MEMORY_CONFIG=configs/default.yaml
    DEFAULT_ARGS="--skip-ab --train-steps 2 --p3-steps 2 --p3-rounds 1"
    GPT2_ARGS="--skip-p3 --skip-ab --train-steps 1"
else
    GPT2='{"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304, "bias": true}'
    S=1 R5=5 R10=10 MEMORY_CONFIG=configs/gpt2_124m.yaml
    DEFAULT_ARGS="--p3-steps 10 --p3-rounds 3"  # the fourth session's P3 size: the part fits its 100 s
    # P3 of the 124 M model as in the fourth session's run; no direct A/B: P2's train step is the config's
    # optimizer step (40 accumulated micro-batches), which would make 100-step fits take minutes
    GPT2_ARGS="--skip-ab --train-steps 5 --p3-steps 10 --p3-rounds 3"
fi
ROWS='^(device|model|\||default cadence|probe-step peak|direct|Lightning|GPU code path|P1)'
echo "== GPU tests"
timeout $((90 * S)) python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -n 6
echo "== bench: default config"
timeout $((100 * S)) python3 bench/run.py --device "$DEVICE" --rounds "$R10" $DEFAULT_ARGS 2>&1 \
    | tee "$OUT/bench_default.log" | grep -E "$ROWS"
echo "== profile: default config"
timeout $((50 * S)) python3 bench/profile_probe.py --device "$DEVICE" --rounds "$R10" --top 15 > "$OUT/profile_default.log" 2>&1
grep -E '^(\||device kernels)' "$OUT/profile_default.log"
echo "== bench: GPT-2 small"
timeout $((100 * S)) python3 bench/run.py --device "$DEVICE" --config configs/gpt2_124m.yaml --rounds "$R5" --skip-ab $GPT2_ARGS \
    --model-config "$GPT2" 2>&1 | tee "$OUT/bench_gpt2.log" | grep -E "$ROWS"
echo "== profile: GPT-2 small"
timeout $((50 * S)) python3 bench/profile_probe.py --device "$DEVICE" --config configs/gpt2_124m.yaml --model-config "$GPT2" \
    --rounds "$R5" --top 15 > "$OUT/profile_gpt2.log" 2>&1
grep -E '^(\||device kernels)' "$OUT/profile_gpt2.log"
echo "== probe-step peak memory: $MEMORY_CONFIG"
timeout $((40 * S)) python3 bench/probe_memory.py --device "$DEVICE" --config "$MEMORY_CONFIG" 2>&1 \
    | tee "$OUT/memory_gpt2.log" | tail -n 4
echo "== host proxy: the GPU code path's host work, timed on this machine's CPU (calibrates bench/host_proxy.py)"
timeout $((30 * S)) python3 bench/host_proxy.py --rounds 20 2>&1 | tee "$OUT/host_proxy_default.log" | grep -E '^(\||host proxy)'
echo "== per-probe costs: GPT-2 small"
timeout $((50 * S)) python3 bench/profile_probe.py --device "$DEVICE" --config configs/gpt2_124m.yaml --model-config "$GPT2" \
    --per-probe --rounds "$R10" 2>&1 | tee "$OUT/per_probe_gpt2.log" | grep -E '^(\||all probes|per-probe)'
