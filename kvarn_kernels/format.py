"""The KVarN storage format: presets, the byte layout of one (tile, KV head) record, and cache allocation.

This module is the single source of truth for the layout; kernels, front-ends and docs read it from here.

Format version 2. A tile is one KV head of G consecutive tokens. Keys and values are each quantized as a
matrix X[R, C] (each row gets its own range) in the Hadamard-rotated frame (K: in its own frame when the
record's K-frame flag says so, see below):

    X[r, c] = (code[r, c] * row_scale[r] + row_zero[r]) * col_scale[c]

- K: R = head_dim channels, C = G tokens (per-channel ranges over the tile, like KIVI keys).
- V: R = G tokens, C = head_dim channels (per-token ranges).

Codes of both K and V are stored channel-major: code row d holds the tile's G tokens of channel d (for V
that is the transpose of its quantization matrix). A row is a run of words of 4*b bits (int16 for 4-bit
codes, one byte for 2-bit codes, little-endian); word j holds the codes of tokens j, j + G/4, j + G/2 and
j + 3G/4 at bits 0, b, 2b and 3b. This "planar" packing lets a kernel unpack a quarter of the tile's
tokens with one shift and mask, with no interleaving shuffles.

One record, in this byte order (every section starts on a 16-byte boundary):

    [K codes  D x G*bk/8 bytes] [V codes  D x G*bv/8 bytes]
    [K row_scale[D] | K row_zero[D] | K col_scale[G] | V row_scale[G] | V row_zero[G] | V col_scale[D]]

Scales are 16-bit: float16 for float16 models, bfloat16 for bfloat16 and float32 models (bf16 activations
exceed float16's 65504; bfloat16 has float32's range).

K-frame flag (new in version 2): K col_scale values are positive, so the sign bit of K col_scale[0] is free;
when it is set, this record's K was quantized unrotated (original frame) and col_scale[0] is its magnitude.
The quantizer leaves K unrotated unless rotating lowers the tile's per-channel range cost Σ_d range_d²
(`reference.choose_k_rotation`): loud, bounded key channels (e.g. RoPE'd key biases) keep their own ranges.
V is always rotated. Version 1 records (no flag) read as rotated.

head_dim 96 (Phi-3-mini) needs no padding in the record: every section above is sized with D = 96 (96 code rows of
K and of V, 96-word D scale sections), and the rotation is the order-96 Hadamard matrix H12 ⊗ H8 (`hadamard`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FORMAT_VERSION = 2
# 96 (Phi-3/3.5-mini): records hold 96 channels; kernels run 128 wide in registers (`hadamard.padded_dim`).
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
SUPPORTED_BITS = (2, 4)
SUPPORTED_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

PRESETS: dict[str, tuple[int, int, int]] = {
    "kvarn_k4v2_g128": (4, 2, 128),
    "kvarn_k4v4_g128": (4, 4, 128),
    "kvarn_k4v2_g64": (4, 2, 64),
    "kvarn_k4v4_g64": (4, 4, 64),
    "kvarn_k2v2_g128": (2, 2, 128),
}
DEFAULT_PRESET = "kvarn_k4v2_g128"
# The scale sections after the codes, in record order: (name, length: "D" = head_dim words, "G" = group words).
SCALE_SECTIONS = (("k_row_scale", "D"), ("k_row_zero", "D"), ("k_col_scale", "G"),
                  ("v_row_scale", "G"), ("v_row_zero", "G"), ("v_col_scale", "D"))
NUM_SCALE_SECTIONS = len(SCALE_SECTIONS)
# The K-frame flag is the sign bit of word 0 of this section (see the module docstring).
K_FRAME_FLAG_SECTION = "k_col_scale"


# Constexpr functions: host code calls them as plain functions, @triton.jit code on constexprs (D, G), so kernels
# take every offset from here.
@triton.constexpr_function
def scale_word_offsets(head_dim: int, group: int) -> dict[str, int]:
    """Word offsets of each scale section inside the scale part of a record."""
    offsets, pos = {}, 0
    for name, axis in SCALE_SECTIONS:
        offsets[name] = pos
        pos += head_dim if axis == "D" else group
    return offsets


@triton.constexpr_function
def scale_offset(section: str, head_dim: int, group: int) -> int:
    """Word offset of one scale section (e.g. `scale_offset("v_row_zero", D, G)` in a kernel)."""
    return scale_word_offsets(head_dim, group)[section]


@triton.constexpr_function
def k_frame_flag_offset(head_dim: int, group: int) -> int:
    """Word offset (in the scale part) of the 16-bit scale whose sign bit is the K-frame flag."""
    return scale_word_offsets(head_dim, group)[K_FRAME_FLAG_SECTION]


def scale_section_sizes(head_dim: int, group: int) -> list[int]:
    """Lengths in words of the scale sections, in record order (for `torch.split`)."""
    return [head_dim if axis == "D" else group for _, axis in SCALE_SECTIONS]


def k_frame_rotated(flag_scale: torch.Tensor) -> torch.Tensor:
    """Decode the K-frame flag from the flag scale (K col_scale[0]) of records: True where K is stored rotated."""
    return ~torch.signbit(flag_scale)


def mark_k_frame(flag_scale: torch.Tensor, rotated: torch.Tensor) -> torch.Tensor:
    """Encode the K-frame flag into the (positive) flag scale: negated where K is stored unrotated."""
    return torch.where(rotated, flag_scale, -flag_scale)


@triton.jit
def k_frame_is_rotated(flag_scale):
    """Kernel side of `k_frame_rotated`: the sign bit of the loaded flag scale(s), as an integer test (a float
    compare would read -0.0 as not negative)."""
    if flag_scale.dtype.primitive_bitwidth == 16:
        rotated = flag_scale.to(tl.int16, bitcast=True) >= 0
    else:
        rotated = flag_scale.to(tl.int32, bitcast=True) >= 0
    return rotated


def scale_dtype_for(activation_dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype scales are stored in for activations of `activation_dtype`."""
    if activation_dtype not in SUPPORTED_ACTIVATION_DTYPES:
        raise ValueError(
            f"activation dtype {activation_dtype} is not supported: use one of "
            f"{', '.join(str(d) for d in SUPPORTED_ACTIVATION_DTYPES)}"
        )
    return torch.float16 if activation_dtype == torch.float16 else torch.bfloat16


@dataclass(frozen=True)
class KVarNFormat:
    """The layout of one (tile, KV head) record for a preset, head_dim and scale dtype."""

    preset: str
    k_bits: int
    v_bits: int
    group: int
    head_dim: int
    scale_dtype: torch.dtype = torch.float16

    @classmethod
    def from_preset(
        cls, preset: str, head_dim: int, activation_dtype: torch.dtype = torch.float16
    ) -> KVarNFormat:
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is unknown: use one of {', '.join(PRESETS)}")
        k_bits, v_bits, group = PRESETS[preset]
        return cls(preset, k_bits, v_bits, group, head_dim, scale_dtype_for(activation_dtype))

    def __post_init__(self) -> None:
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head_dim {self.head_dim} is not supported: use one of {SUPPORTED_HEAD_DIMS}"
            )
        for name, bits in (("k_bits", self.k_bits), ("v_bits", self.v_bits)):
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"{name} {bits} is not supported: use one of {SUPPORTED_BITS}")
        if self.group not in (64, 128):
            raise ValueError(f"group {self.group} is not supported: use 64 or 128")
        if self.scale_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"scale dtype {self.scale_dtype} is not supported: use float16 or bfloat16")

    # --- sizes -----------------------------------------------------------------------------------
    @property
    def k_code_bytes(self) -> int:
        return self.head_dim * self.group * self.k_bits // 8

    @property
    def v_code_bytes(self) -> int:
        return self.group * self.head_dim * self.v_bits // 8

    @property
    def code_bytes(self) -> int:
        """Bytes of packed codes (K then V) at the start of a record."""
        return self.k_code_bytes + self.v_code_bytes

    @property
    def num_scales(self) -> int:
        """16-bit scale words after the codes: K row_scale/row_zero (D each), K col_scale (G), V alike."""
        return sum(scale_section_sizes(self.head_dim, self.group))

    @property
    def record_bytes(self) -> int:
        return self.code_bytes + 2 * self.num_scales

    @property
    def bytes_per_token_per_head(self) -> float:
        return self.record_bytes / self.group

    @property
    def slot_bytes(self) -> int:
        """Whole bytes per token per KV head, for page arithmetic that counts whole bytes per token (vLLM's):
        record_bytes / group rounded up. Exact for every preset and head_dim except 96 with 128-token tiles (k4v2:
        82.5 B/token, so a page row of 128 x 83 = 10624 bytes holds the 10560-byte record: 0.6 % unused)."""
        return -(-self.record_bytes // self.group)

    @property
    def page_row_bytes(self) -> int:
        """Bytes of one (block, KV head) row of such a page: group x slot_bytes (>= record_bytes, a multiple of 16)."""
        return self.group * self.slot_bytes

    @property
    def bits_per_element(self) -> float:
        return 8 * self.record_bytes / (2 * self.group * self.head_dim)

    @property
    def compression_vs_16bit(self) -> float:
        return (2 * 2 * self.head_dim) / self.bytes_per_token_per_head

    def scale_offsets(self) -> dict[str, int]:
        """Word offsets of each scale section inside the scale part of a record."""
        return scale_word_offsets(self.head_dim, self.group)

    def layout(self) -> dict[str, int]:
        """The record layout as plain ints: byte offsets and sizes of the code sections, the scale part's word
        offsets (one per scale section) and the K-frame flag's word."""
        return {
            "k_codes": 0, "k_code_bytes": self.k_code_bytes,
            "v_codes": self.k_code_bytes, "v_code_bytes": self.v_code_bytes,
            "scales": self.code_bytes, "num_scales": self.num_scales, "record_bytes": self.record_bytes,
            **self.scale_offsets(),
            "k_frame_flag": k_frame_flag_offset(self.head_dim, self.group),
        }

    def describe(self) -> dict:
        """Everything `kvarn info` prints, as plain data."""
        sizes = dict(zip((name for name, _ in SCALE_SECTIONS), scale_section_sizes(self.head_dim, self.group),
                         strict=True))
        k_bits_total = 8 * (self.k_code_bytes + 2 * sum(n for name, n in sizes.items() if name.startswith("k_")))
        v_bits_total = 8 * (self.v_code_bytes + 2 * sum(n for name, n in sizes.items() if name.startswith("v_")))
        elems = self.group * self.head_dim
        return {
            "format_version": FORMAT_VERSION,
            "preset": self.preset,
            "k_bits": self.k_bits,
            "v_bits": self.v_bits,
            "group": self.group,
            "head_dim": self.head_dim,
            "scale_dtype": str(self.scale_dtype).replace("torch.", ""),
            "record_bytes": self.record_bytes,
            "sections": {
                "k_codes": [0, self.k_code_bytes],
                "v_codes": [self.k_code_bytes, self.v_code_bytes],
                "scales": [self.code_bytes, 2 * self.num_scales],
            },
            "scale_word_offsets": self.scale_offsets(),
            "bytes_per_token_per_head": self.bytes_per_token_per_head,
            "bits_per_element": self.bits_per_element,
            "k_bits_per_element": k_bits_total / elems,
            "v_bits_per_element": v_bits_total / elems,
            "compression_vs_16bit": self.compression_vs_16bit,
            "page_row_bytes": self.page_row_bytes,
        }

    # --- storage ---------------------------------------------------------------------------------
    def allocate(self, num_blocks: int, num_kv_heads: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zeroed paged cache: uint8 [num_blocks, num_kv_heads, record_bytes]."""
        if num_blocks < 1 or num_kv_heads < 1:
            raise ValueError(f"num_blocks {num_blocks} and num_kv_heads {num_kv_heads} must be >= 1")
        return torch.zeros(num_blocks, num_kv_heads, self.record_bytes, dtype=torch.uint8, device=device)

    def split(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a paged cache: codes uint8 [N, H, code_bytes] and scales [N, H, num_scales]."""
        self.check_cache(cache)
        codes = cache[..., : self.code_bytes]
        scales = cache[..., self.code_bytes :].view(self.scale_dtype)
        return codes, scales

    def word_views(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of a paged cache as kernels read it: K words, V words [N, H, D*G/4] and scales [N, H, S]."""
        codes, scales = self.split(cache)
        k_words = codes[..., : self.k_code_bytes].view(word_dtype(self.k_bits))
        v_words = codes[..., self.k_code_bytes :].view(word_dtype(self.v_bits))
        return k_words, v_words, scales

    def check_cache(self, cache: torch.Tensor) -> None:
        if cache.dtype != torch.uint8 or cache.dim() != 3 or cache.shape[-1] != self.record_bytes:
            raise ValueError(
                f"cache of dtype {cache.dtype} and shape {tuple(cache.shape)} does not hold {self.preset} "
                f"records: expected uint8 [num_blocks, num_kv_heads, {self.record_bytes}]"
            )
        # One record per row; rows may be wider than a record (`page_row_bytes`: vLLM pages at head_dim 96).
        row = cache.stride(1)
        if cache.stride(-1) != 1 or row < self.record_bytes or row % 16:
            raise ValueError(f"cache must hold one record per row: unit stride in its last dimension and a row stride "
                             f"that is a multiple of 16 of at least {self.record_bytes} bytes, got strides "
                             f"{tuple(cache.stride())}")


def word_dtype(bits: int) -> torch.dtype:
    """The storage word of four codes: int16 for 4-bit codes, uint8 for 2-bit codes."""
    return torch.int16 if bits == 4 else torch.uint8


def check_alignment(fmt: KVarNFormat) -> None:
    """Every section of a record starts on a 16-byte boundary (vector loads on the GPU rely on it)."""
    for offset in (fmt.k_code_bytes, fmt.code_bytes, fmt.record_bytes):
        if offset % 16:
            raise AssertionError(f"{fmt.preset} head_dim {fmt.head_dim}: offset {offset} is not 16-aligned")

