#!/usr/bin/env bash
# The vLLM plugin on the GPU machine, in stages that each fit one device call (10 min), most important first; partial
# results land under $OUT (default benchmarks/vllm/results). Needs the wheelhouse parts stashed (../shared/device/
# README.md) and, for `e2e`, the SmolLM2 GGUF parts (ship.sh smollm2):
#   OUT=$OUT bash benchmarks/vllm/gpu_all.sh e2e          # install, backend test, SmolLM2: graphs, serve, prefix (~6 min)
#   OUT=$OUT bash benchmarks/vllm/gpu_all.sh throughput   # Llama-8B shape: KVarN, fp8, bf16 (~8 min)
#   OUT=$OUT bash benchmarks/vllm/gpu_all.sh verify       # smoke + verify-shape kernel vs FA3 fp8 (~5 min)
set -uo pipefail
OUT=${OUT:-benchmarks/vllm/results}
mkdir -p "$OUT"
export VLLM_USE_FLASHINFER_SAMPLER=0
bash benchmarks/vllm/gpu_install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site
python3 -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name())"
case "${1:-e2e}" in
  e2e)
    echo "== backend step test (GPU kernels vs reference)"
    timeout 120 python3 -m pytest -q -x tests/kvarn_vllm/test_backend.py -k cuda > "$OUT/test_backend_gpu.log" 2>&1
    tail -3 "$OUT/test_backend_gpu.log"
    echo "== SmolLM2-135M: convert, then greedy e2e"
    if [ -f /tmp/ship/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ ! -d /tmp/smollm2-hf ]; then
      timeout 120 python3 benchmarks/vllm/gguf_to_hf.py /tmp/ship/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        /tmp/smollm2-hf --dtype bfloat16 > "$OUT/convert.log" 2>&1; tail -2 "$OUT/convert.log"
    fi
    timeout ${E2E_S:-330} python3 benchmarks/vllm/e2e_greedy.py --model /tmp/smollm2-hf --presets kvarn_k4v2_g64 \
      --modes ${E2E_MODES:-graphs,serve,prefix} --timeout 150 --out "$OUT/e2e_smollm2.json" > "$OUT/e2e.log" 2>&1
    grep -v "^INFO\|^WARNING\|^(EngineCore\|^(APIServer" "$OUT/e2e.log" | cut -c1-1500 | tail -30 ;;
  throughput)
    timeout ${TPUT_S:-570} python3 benchmarks/vllm/bench_throughput.py --kv ${TPUT_KV:-kvarn_k4v2_g128,fp8,auto} \
      --shapes ${TPUT_SHAPES:-32x2048+512,96x12288+512} --timeout 185 --out "$OUT/throughput.jsonl" \
      > "$OUT/throughput.log" 2>&1
    grep -v "^INFO\|^WARNING\|^(EngineCore" "$OUT/throughput.log" | cut -c1-2000 | tail -10 ;;
  verify)
    timeout 200 python3 benchmarks/vllm/smoke.py > "$OUT/smoke.log" 2>&1
    grep -v "^INFO\|^WARNING\|^(EngineCore" "$OUT/smoke.log" | tail -20
    timeout ${VERIFY_S:-90} python3 benchmarks/vllm/bench_verify_kernel.py --batches 8,32 --histories 4096,16384 \
      --q-lens 2,4,8 --out "$OUT/verify_kernel.json" > "$OUT/verify.log" 2>&1
    tail -14 "$OUT/verify.log" ;;
  *) echo "stages: e2e, throughput, verify" >&2; exit 2 ;;
esac
