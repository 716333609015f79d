"""KVarN kernel core: the storage format, a plain-PyTorch reference, and the Triton kernels."""

from .format import DEFAULT_PRESET, FORMAT_VERSION, PRESETS, KVarNFormat, scale_dtype_for
from .state import PagedKV

__all__ = ["DEFAULT_PRESET", "FORMAT_VERSION", "PRESETS", "KVarNFormat", "PagedKV", "scale_dtype_for"]
