"""GPU diagnostics: NaN/Inf poisoning of the quantize kernel versus the reference
(results/gpu_tests/h100/2026-11-23_521f454_run1.log)."""
import torch

from kvarn_kernels import reference as ref
from kvarn_kernels.format import KVarNFormat
from kvarn_kernels.quantize import quantize_into_cache
from kvarn_kernels.reference import synthetic_kv

DEV = "cuda" if torch.cuda.is_available() else "cpu"

for dtype in (torch.bfloat16, torch.float32, torch.float16):
    for what in ("v_inf", "v_nan", "k_inf"):
        fmt = KVarNFormat.from_preset("kvarn_k4v2_g128", 128, dtype)
        k, v = synthetic_kv(128, 2, 128, dtype, device=DEV)
        starts = torch.zeros(1, dtype=torch.int32, device=DEV)
        (v if what.startswith("v") else k)[9, 1, 3] = float("inf") if what.endswith("inf") else float("nan")
        gpu = fmt.allocate(1, 2, DEV)
        quantize_into_cache(k, v, starts, starts, gpu, fmt)
        cpu = fmt.allocate(1, 2, DEV)
        ref.quantize_into_cache_ref(k, v, starts, starts, cpu, fmt)
        sg = fmt.word_views(gpu)[2]
        sc = fmt.word_views(cpu)[2]
        kh, vh = ref.dequantize_tiles(gpu, fmt)
        kr, vr = ref.dequantize_tiles(cpu, fmt)
        print(dtype, what, "gpu finite k/v head1:", torch.isfinite(kh[0, 1]).all().item(),
              torch.isfinite(vh[0, 1]).all().item(), "ref:", torch.isfinite(kr[0, 1]).all().item(),
              torch.isfinite(vr[0, 1]).all().item(),
              "gpu scales head1 nonfinite:", (~torch.isfinite(sg[0, 1].float())).sum().item(),
              "ref:", (~torch.isfinite(sc[0, 1].float())).sum().item())
