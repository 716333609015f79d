"""Constants of the KVarN quantizer, shared by its plain-PyTorch definition (`codec`) and the Triton kernel
(`quantize`)."""

NORMALIZE_ITERS = 8
STD_MIN, STD_MAX = 1e-3, 1e3
LOG_SCALE_MIN, LOG_SCALE_MAX = -0.3, 10.0
RTN_MIN_SCALE = 1e-10
# Fall back to the untouched tile only when balancing predicts this many times its error: the guard is
# for pathological tiles (one huge outlier), not a second optimizer.
GUARD_FACTOR = 4.0
