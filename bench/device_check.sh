#!/usr/bin/env bash
# The one prepared device check (issue: performance). On a lent GPU machine, from the repo root:
#   make device-wheels                     # here, once: wheels the device image lacks -> .whl/
#   device run: carry [".whl"], command "bash bench/device_check.sh", timeout_s 540
# Installs the carried wheels, runs the GPU tests, then bench/run.py and bench/profile_probe.py on the
# default config and on GPT-2 small (12 layers, 12 heads, 768 wide, 1,024 context, 50,304 vocabulary),
# the probe step's peak GPU memory for GPT-2 (bench/probe_memory.py) and, last, what each probe costs
# in GPT-2's probe run (profile_probe.py --per-probe), logging under $OUT. Each part has its own
# timeout (500 s together) so a slow part cannot starve the rest.
set -uo pipefail
OUT=${OUT:-/tmp/lens-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY' || exit 1
import lightning, torch, transformer_lens
print("torch", torch.__version__, "| lightning", lightning.__version__, "| transformer-lens",
      getattr(transformer_lens, "__version__", "?"), "| cuda", torch.cuda.is_available())
PY
GPT2='{"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304, "bias": true}'
ROWS='^(device|model|\||default cadence|probe-step peak|direct|Lightning|P1)'
echo "== GPU tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 6
echo "== bench: default config"
timeout 100 python3 bench/run.py --device cuda --rounds 10 2>&1 | tee "$OUT/bench_default.log" | grep -E "$ROWS"
echo "== profile: default config"
timeout 50 python3 bench/profile_probe.py --device cuda --top 15 > "$OUT/profile_default.log" 2>&1
grep -E '^(\||device kernels)' "$OUT/profile_default.log"
echo "== bench: GPT-2 small"
timeout 120 python3 bench/run.py --device cuda --config configs/gpt2_124m.yaml --rounds 5 --skip-ab --train-steps 5 \
    --model-config "$GPT2" 2>&1 | tee "$OUT/bench_gpt2.log" | grep -E "$ROWS"
echo "== profile: GPT-2 small"
timeout 50 python3 bench/profile_probe.py --device cuda --config configs/gpt2_124m.yaml --model-config "$GPT2" \
    --rounds 5 --top 15 > "$OUT/profile_gpt2.log" 2>&1
grep -E '^(\||device kernels)' "$OUT/profile_gpt2.log"
echo "== probe-step peak memory: GPT-2 small"
timeout 40 python3 bench/probe_memory.py --device cuda --config configs/gpt2_124m.yaml 2>&1 | tee "$OUT/memory_gpt2.log" | tail -n 4
echo "== per-probe costs: GPT-2 small"
timeout 50 python3 bench/profile_probe.py --device cuda --config configs/gpt2_124m.yaml --model-config "$GPT2" \
    --per-probe --rounds 10 2>&1 | tee "$OUT/per_probe_gpt2.log" | grep -E '^(\||all probes|per-probe)'
