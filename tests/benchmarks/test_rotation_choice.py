"""Fast checks of the K-rotation decision (benchmarks.experiments.rotation_choice) on synthetic tiles."""

from __future__ import annotations

import math

import torch

from benchmarks.experiments.rotation_choice import choose_k_rotation, k_range_cost, record_paths, sink_query_weights
from kvarn_kernels import reference


def _rope_bias_tiles(n: int, h: int, g: int, d: int, amp: float, seed: int = 0) -> torch.Tensor:
    """Small Gaussian keys plus a large key bias rotated by RoPE over positions: a few loud, bounded channels."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, h, g, d, generator=gen)
    pos = torch.arange(n * g, dtype=torch.float32).reshape(n, 1, g)
    for i, theta in ((0, 1.0), (3, 0.3), (5, 0.05)):  # pairs (i, i + d/2), as in HF rotate_half
        b = amp * (1 + torch.rand(h, 1, generator=gen))
        k[..., i] += b * torch.cos(theta * pos)
        k[..., i + d // 2] += b * torch.sin(theta * pos)
    return k


def test_loud_rope_bias_channels_are_not_rotated() -> None:
    k = _rope_bias_tiles(3, 2, 128, 64, amp=30.0)
    assert not choose_k_rotation(k).any()


def test_heavy_tailed_tiles_are_rotated() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 2, 128, 64, generator=gen)
    chi2 = torch.randn(4, 2, 128, 64, 3, generator=gen).square().sum(-1)
    assert choose_k_rotation(z / (chi2 / 3).sqrt()).all()


def test_shapes_ties_and_precomputed_rotation() -> None:
    k = torch.randn(5, 3, 64, 128)
    flags = choose_k_rotation(k)
    assert flags.shape == (5, 3) and flags.dtype == torch.bool
    assert torch.equal(flags, choose_k_rotation(k, k_rot=reference.rotate(k)))
    assert not choose_k_rotation(torch.zeros(2, 64, 64)).any()  # equal costs: not rotated
    assert not choose_k_rotation(torch.ones(2, 64, 64)).any()  # constant: zero range in both frames
    # Two loud channels swinging independently: every rotated channel carries both, so its range is about the sum
    # of their ranges (cost ~ (r1 + r2)^2 against r1^2 + r2^2 unrotated).
    two = torch.zeros(1, 128, 64)
    two[..., 7] = torch.sin(torch.arange(128.0))
    two[..., 40] = torch.cos(0.37 * torch.arange(128.0))
    assert k_range_cost(reference.rotate(two)) > 1.5 * k_range_cost(two) and not choose_k_rotation(two).any()
    # The margin scales the threshold: a huge margin always rotates, a tiny one never does.
    assert choose_k_rotation(k, margin=100.0).all() and not choose_k_rotation(k, margin=0.01).any()


def test_unrotated_record_path_reconstructs_the_tile() -> None:
    k = _rope_bias_tiles(2, 2, 128, 64, amp=30.0)
    v = torch.randn_like(k)
    k_rot, k_plain, _ = record_paths(k, v, "k4v2_g128")
    rel = [float((x - k).norm() / k.norm()) for x in (k_rot, k_plain)]
    assert all(math.isfinite(r) and r < 0.1 for r in rel)
    # Quiet channels keep their precision only in the unrotated frame.
    quiet = [c for c in range(64) if c not in (0, 3, 5, 32, 35, 37)]
    err_rot = (k_rot - k)[..., quiet].square().mean()
    err_plain = (k_plain - k)[..., quiet].square().mean()
    assert err_plain < err_rot / 4


def test_query_weighted_rule() -> None:
    k = _rope_bias_tiles(3, 2, 128, 64, amp=30.0)
    # Uniform weights are the unweighted rule, whatever their scale.
    assert torch.equal(choose_k_rotation(k, channel_weights=torch.full((2, 64), 3.0)), choose_k_rotation(k))
    # Queries that read only the loud channels want them spread by the rotation; queries on quiet ones do not.
    loud = torch.zeros(2, 64)
    loud[:, [0, 3, 5, 32, 35, 37]] = 1.0
    assert choose_k_rotation(k, channel_weights=loud).all()
    assert not choose_k_rotation(k, channel_weights=1.0 - loud).any()
    q = torch.randn(6, 128, 64)  # 6 query heads over 2 KV heads
    w = sink_query_weights(q, 2)
    assert w.shape == (2, 64) and torch.allclose(w[1], q[3:].square().mean((0, 1)))
