#!/usr/bin/env bash
# Everything the vLLM plugin needs measured on the GPU machine, in order of importance, each stage bounded so that
# partial results come back (under $OUT, default benchmarks/vllm/results). Assumes the wheelhouse parts and the
# SmolLM2 GGUF parts were carried (../shared/device/README.md, ship.sh smollm2).
set -uo pipefail
OUT=${OUT:-benchmarks/vllm/results}
mkdir -p "$OUT"
export VLLM_USE_FLASHINFER_SAMPLER=0
bash benchmarks/vllm/gpu_install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site
tail -3 "$OUT/install.log"
python3 -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name())"
echo "== backend step test (GPU kernels vs reference)"
timeout 120 python3 -m pytest -q -x tests/kvarn_vllm/test_backend.py -k cuda > "$OUT/test_backend_gpu.log" 2>&1
tail -3 "$OUT/test_backend_gpu.log"
echo "== smoke (tiny dummy Llama, 16-bit vs KVarN eager/graphs)"
timeout 200 python3 benchmarks/vllm/smoke.py > "$OUT/smoke.log" 2>&1
grep -v "^INFO\|^WARNING\|^(EngineCore" "$OUT/smoke.log" | tail -20
echo "== SmolLM2-135M: convert, then greedy e2e"
if [ -f /tmp/ship/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ ! -d /tmp/smollm2-hf ]; then
  timeout 120 python3 benchmarks/vllm/gguf_to_hf.py /tmp/ship/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-hf \
    --dtype bfloat16 > "$OUT/convert.log" 2>&1; tail -2 "$OUT/convert.log"
fi
if [ -d /tmp/smollm2-hf ]; then
  timeout ${E2E_S:-260} python3 benchmarks/vllm/e2e_greedy.py --model /tmp/smollm2-hf --modes ${E2E_MODES:-eager,graphs,serve,prefix,ngram} \
    --timeout 150 --out "$OUT/e2e_smollm2.json" > "$OUT/e2e.log" 2>&1
  grep -v "^INFO\|^WARNING\|^(EngineCore\|^(APIServer" "$OUT/e2e.log" | cut -c1-1500 | tail -30
fi
echo "== verify-shape kernel bench vs FA3 fp8"
timeout ${VERIFY_S:-90} python3 benchmarks/vllm/bench_verify_kernel.py --batches 8,32 --histories 4096,16384 --q-lens 2,4,8 \
  --out "$OUT/verify_kernel.json" > "$OUT/verify.log" 2>&1
tail -14 "$OUT/verify.log"
echo "== throughput (Llama-3.1-8B shape, dummy weights)"
timeout ${TPUT_S:-240} python3 benchmarks/vllm/bench_throughput.py --kv ${TPUT_KV:-kvarn_k4v2_g128,fp8} --shapes ${TPUT_SHAPES:-32x2048+512} \
  --timeout 230 --out "$OUT/throughput.jsonl" > "$OUT/throughput.log" 2>&1
grep -v "^INFO\|^WARNING\|^(EngineCore" "$OUT/throughput.log" | cut -c1-2000 | tail -10
