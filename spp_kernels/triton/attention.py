"""Flash attention for pruned widths (SPEC §4 ``attention``): qk width D != v width Dv, widths
that are not multiples of 8/16, explicit scale, key-padding or causal masks or any bool
(B | 1, H | 1, N, M) mask (read per tile; the keys no query of a batch row attends are its
padding), an additive score bias (Swin's relative position bias and shifted-window mask, read
per tile from its (Bb, Hb) rows), and (in :func:`attention_ragged`) a different width per head.

Forward: one program per (batch·head, block of queries), an online softmax over key blocks with
running max and sum in fp32; it saves the row log-sum-exp (``+inf`` for a row with no key, so
that every recomputed probability of that row is 0). Backward: ``delta = rowsum(dO ⊙ O)``
(preprocess kernel), then one kernel for dk/dv (a program per key block, looping over queries)
and one for dq (a program per query block, looping over keys) — no atomics. Widths are padded
to powers of two (>= 16, the smallest ``tl.dot`` tile) with masked loads; all accumulation is fp32.

The kernels are wrapped as custom ops ``spp_triton::attention_fwd`` (returns out and lse) and
``spp_triton::attention_bwd`` with fake implementations and ``register_autograd``, so they pass
``torch.library.opcheck`` and stay opaque single nodes under ``torch.compile``.

Under ``TRITON_INTERPRET=1`` ``tl.dot`` on fp16/bf16 tiles is wrong, so the kernels cast tiles to
fp32 there (constexpr ``F32_DOT``); fp32 dots always use ``input_precision="ieee"`` (the GPU default
would be TF32).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import dispatch, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _key_ok(offs_n, M, mask_ptr, b, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) bool: key j exists and is not padding. k and v load as zero elsewhere, so that
    an inf or NaN at a padding position cannot reach the output (p = 0 there, but 0 * inf = NaN)."""
    ok = offs_n < M
    if HAS_MASK:
        km = tl.load(mask_ptr + b.to(tl.int64) * M + offs_n, mask=ok, other=0)
        ok = ok & (km != 0)
    return ok


@triton.jit
def _allowed(offs_m, offs_n, key_ok, N, M, IS_CAUSAL: tl.constexpr, keep_ptr, bh, H, KB, KH, HAS_KEEP: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key j is allowed (``key_ok``, from :func:`_key_ok`), is not in
    the causal future of query i, and (with a 4-D mask) the (Kb, Kh, N, M) int8 keep-mask admits
    it for the (batch, head) pair ``bh``: row (b % Kb) · Kh + h % Kh, Kb in {1, B}, Kh in {1, H}."""
    ok = (offs_m[:, None] >= 0) & key_ok[None, :]
    if IS_CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (M - N))
    if HAS_KEEP:
        row = ((bh // H) % KB) * KH + (bh % H) % KH
        ptr = keep_ptr + row * N * M + offs_m[:, None].to(tl.int64) * M + offs_n[None, :]
        ok = ok & (tl.load(ptr, mask=(offs_m[:, None] < N) & (offs_n[None, :] < M), other=0) != 0)
    return ok


@triton.jit
def _bias(bias_ptr, bh, H, BB, HB, offs_m, offs_n, N, M):
    """(BLOCK_M, BLOCK_N) fp32 tile of the additive bias (Bb, Hb, N, M) that (batch, head) pair
    ``bh`` adds: row (b % Bb) · Hb + h % Hb; 0 outside the (N, M) scores."""
    row = ((bh // H) % BB) * HB + (bh % H) % HB
    ptr = bias_ptr + row * N * M + offs_m[:, None].to(tl.int64) * M + offs_n[None, :]
    return tl.load(ptr, mask=(offs_m[:, None] < N) & (offs_n[None, :] < M), other=0.0).to(tl.float32)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr, kend_ptr, qkw_ptr, vw_ptr, bias_ptr, keep_ptr,
    H, N, M, D, DV, scale, BB, HB, KB, KH,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, RAGGED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_KEEP: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_lim = D
    dv_lim = DV
    if RAGGED:  # channels beyond this head's width read as zero
        h = bh % H
        d_lim = tl.minimum(tl.load(qkw_ptr + h), D)
        dv_lim = tl.minimum(tl.load(vw_ptr + h), DV)
    dmask = offs_d < d_lim
    dvmask = offs_dv < dv_lim

    q = tl.load(q_ptr + bh * N * D + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < N) & dmask[None, :], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    hi = M
    if IS_CAUSAL:  # keys beyond the last query's diagonal are never attended
        hi = tl.minimum(M, (pid_m + 1) * BLOCK_M + (M - N))
    if HAS_MASK:  # nor those after the batch row's last kept key (a right-padded batch's padding)
        hi = tl.minimum(hi, tl.load(kend_ptr + b))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = _key_ok(offs_n, M, mask_ptr, b, HAS_MASK)
        k = tl.load(k_ptr + bh * M * D + offs_n[:, None] * D + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_ptr + bh * M * DV + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=nmask[:, None] & dvmask[None, :], other=0.0)
        if F32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, tl.trans(k), IEEE) * scale
        if HAS_BIAS:
            s += _bias(bias_ptr, bh, H, BB, HB, offs_m, offs_n, N, M)
        ok = _allowed(offs_m, offs_n, nmask, N, M, IS_CAUSAL, keep_ptr, bh, H, KB, KH, HAS_KEEP)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key so far: no NaN
        alpha = tl.exp(m_i - m_sub)
        p = tl.exp(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc += _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
    omask = offs_m < N
    tl.store(o_ptr + bh * N * DV + offs_m[:, None] * DV + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=omask[:, None] & (offs_dv[None, :] < DV))
    tl.store(lse_ptr + bh * N + offs_m, lse, mask=omask)


@triton.jit
def _attn_bwd_preprocess(o_ptr, do_ptr, delta_ptr, R, DV, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[r] = sum_c dO[r, c] * O[r, c] in fp32, rows r of the flattened (B·H·N, Dv)."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_DV)
    msk = (offs_r[:, None] < R) & (offs_c[None, :] < DV)
    o = tl.load(o_ptr + offs_r[:, None] * DV + offs_c[None, :], mask=msk, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs_r[:, None] * DV + offs_c[None, :], mask=msk, other=0.0).to(tl.float32)
    tl.store(delta_ptr + offs_r, tl.sum(o * do, 1), mask=offs_r < R)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, mask_ptr, kend_ptr, qkw_ptr, vw_ptr, bias_ptr, keep_ptr,
    H, N, M, D, DV, scale, BB, HB, KB, KH,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, RAGGED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_KEEP: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = bh // H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_lim = D
    dv_lim = DV
    if RAGGED:
        h = bh % H
        d_lim = tl.minimum(tl.load(qkw_ptr + h), D)
        dv_lim = tl.minimum(tl.load(vw_ptr + h), DV)
    dmask = offs_d < d_lim
    dvmask = offs_dv < dv_lim
    nmask = offs_n < M
    kok = _key_ok(offs_n, M, mask_ptr, b, HAS_MASK)

    k = tl.load(k_ptr + bh * M * D + offs_n[:, None] * D + offs_d[None, :],
                mask=kok[:, None] & dmask[None, :], other=0.0)
    v = tl.load(v_ptr + bh * M * DV + offs_n[:, None] * DV + offs_dv[None, :],
                mask=kok[:, None] & dvmask[None, :], other=0.0)
    if F32_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo = 0
    if IS_CAUSAL:  # queries before this key block's diagonal never attend to it
        lo = tl.maximum(0, pid_n * BLOCK_N - (M - N))
        lo = (lo // BLOCK_M) * BLOCK_M
    hi = N
    if HAS_MASK:  # a block after the batch row's last kept key: all padding, gradients 0
        hi = tl.where(pid_n * BLOCK_N < tl.load(kend_ptr + b), N, lo)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mmask = offs_m < N
        q = tl.load(q_ptr + bh * N * D + offs_m[:, None] * D + offs_d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        do = tl.load(do_ptr + bh * N * DV + offs_m[:, None] * DV + offs_dv[None, :],
                     mask=mmask[:, None] & dvmask[None, :], other=0.0)
        if F32_DOT:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + bh * N + offs_m, mask=mmask, other=float("inf"))
        delta = tl.load(delta_ptr + bh * N + offs_m, mask=mmask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale
        if HAS_BIAS:
            s += _bias(bias_ptr, bh, H, BB, HB, offs_m, offs_n, N, M)
        ok = _allowed(offs_m, offs_n, kok, N, M, IS_CAUSAL, keep_ptr, bh, H, KB, KH, HAS_KEEP)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # lse = +inf (no key): p = 0
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    dk = dk * scale
    tl.store(dk_ptr + bh * M * D + offs_n[:, None] * D + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=nmask[:, None] & (offs_d[None, :] < D))
    tl.store(dv_ptr + bh * M * DV + offs_n[:, None] * DV + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=nmask[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, mask_ptr, kend_ptr, qkw_ptr, vw_ptr, bias_ptr, keep_ptr,
    H, N, M, D, DV, scale, BB, HB, KB, KH,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, RAGGED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_KEEP: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_lim = D
    dv_lim = DV
    if RAGGED:
        h = bh % H
        d_lim = tl.minimum(tl.load(qkw_ptr + h), D)
        dv_lim = tl.minimum(tl.load(vw_ptr + h), DV)
    dmask = offs_d < d_lim
    dvmask = offs_dv < dv_lim
    mmask = offs_m < N

    q = tl.load(q_ptr + bh * N * D + offs_m[:, None] * D + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    do = tl.load(do_ptr + bh * N * DV + offs_m[:, None] * DV + offs_dv[None, :],
                 mask=mmask[:, None] & dvmask[None, :], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + bh * N + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(delta_ptr + bh * N + offs_m, mask=mmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = M
    if IS_CAUSAL:
        hi = tl.minimum(M, (pid_m + 1) * BLOCK_M + (M - N))
    if HAS_MASK:
        hi = tl.minimum(hi, tl.load(kend_ptr + b))
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = _key_ok(offs_n, M, mask_ptr, b, HAS_MASK)
        k = tl.load(k_ptr + bh * M * D + offs_n[:, None] * D + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_ptr + bh * M * DV + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=nmask[:, None] & dvmask[None, :], other=0.0)
        if F32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, tl.trans(k), IEEE) * scale
        if HAS_BIAS:
            s += _bias(bias_ptr, bh, H, BB, HB, offs_m, offs_n, N, M)
        ok = _allowed(offs_m, offs_n, nmask, N, M, IS_CAUSAL, keep_ptr, bh, H, KB, KH, HAS_KEEP)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * scale
    tl.store(dq_ptr + bh * N * D + offs_m[:, None] * D + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=mmask[:, None] & (offs_d[None, :] < D))


def _blocks(D: int, Dv: int, backward: bool, N: int = 1 << 30, M: int = 1 << 30) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV): widths padded to powers of two >= 16 (``tl.dot``'s
    smallest tile); token blocks smaller for wide heads so the tiles fit in shared memory, and no
    larger than the N queries / M keys padded to a power of two (Swin's 49-token windows: 64, not
    128 rows of which 79 would be masked)."""
    bd, bdv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    if INTERPRET:
        return 32, 32, bd, bdv  # few big blocks: the interpreter's cost is per program
    widest = max(bd, bdv)
    if backward:
        bm = 64 if widest <= 64 else (32 if widest <= 128 else 16)
    else:
        bm = 128 if widest <= 64 else (64 if widest <= 128 else 32)
    bn = 64 if widest <= 128 else 32
    bm = max(16, min(bm, triton.next_power_of_2(max(N, 1))))
    bn = max(16, min(bn, triton.next_power_of_2(max(M, 1))))
    return bm, bn, bd, bdv


def _meta(q, attn_mask, is_causal, widths, bias):
    ragged = widths is not None
    return dict(HAS_MASK=attn_mask is not None, IS_CAUSAL=bool(is_causal), RAGGED=ragged,
                HAS_BIAS=bias is not None, HAS_KEEP=attn_mask is not None and attn_mask.dim() == 4,
                F32_DOT=INTERPRET, IEEE=q.dtype == torch.float32)


def _mask_args(q, attn_mask):
    """(the key padding as int8 (B, M), each batch row's end of kept keys as int32 (B,): one past
    its last kept key, 0 when it keeps none, the 4-D mask as int8 (Kb, Kh, N, M), Kb, Kh), with q
    as never-read placeholders for what the mask does not give. The key padding of a 4-D mask is
    the keys some query of the batch row attends (``reference.padding_of``): k and v load as zero
    elsewhere, and the kernels stop at the row's end, so a right-padded batch's padding costs
    nothing with either form of mask. Computed on the device (no synchronisation) and remembered
    per mask (``reference.remembered``): every layer of a forward, and the backward, get the same
    mask, so its few small launches run once, not per call."""
    if attn_mask is None:
        return q, q, q, 1, 1
    B = q.shape[0]
    return reference.remembered(attn_mask, ("triton_mask", B), lambda: _key_padding_args(attn_mask, B))


def _key_padding_args(attn_mask, B: int):
    keep = attn_mask.to(torch.int8).contiguous() if attn_mask.dim() == 4 else None
    M = attn_mask.shape[-1]
    mask_t = reference.padding_of(attn_mask, B).to(torch.int8).contiguous()
    if M == 0:
        kend = torch.zeros(mask_t.shape[0], dtype=torch.int32, device=mask_t.device)
    else:
        pos = torch.arange(1, M + 1, device=attn_mask.device, dtype=torch.int32)
        kend = (mask_t.to(torch.int32) * pos).amax(1).to(torch.int32).contiguous()
    if keep is None:
        return mask_t, kend, mask_t, 1, 1
    return mask_t, kend, keep, keep.shape[0], keep.shape[1]


def _bias_args(q, bias):
    """(bias pointer tensor, Bb, Hb): the contiguous bias, or q as a never-read placeholder."""
    if bias is None:
        return q, 1, 1
    return bias.contiguous(), bias.shape[0], bias.shape[1]


def _forward(q, k, v, scale, attn_mask, is_causal, widths, bias=None):
    B, H, N, D = q.shape
    M, Dv = k.shape[2], v.shape[3]
    o = torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return o, lse
    mask_t, kend, keep_t, kb, kh = _mask_args(q, attn_mask)
    qkw, vw = widths if widths is not None else (q, q)
    bias_t, bb, hb = _bias_args(q, bias)
    bm, bn, bd, bdv = _blocks(D, Dv, backward=False, N=N, M=M)
    grid = (B * H, triton.cdiv(N, bm))
    _attn_fwd_kernel[grid](q, k, v, o, lse, mask_t, kend, qkw, vw, bias_t, keep_t, H, N, M, D, Dv, float(scale),
                           bb, hb, kb, kh,
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv,
                           **_meta(q, attn_mask, is_causal, widths, bias))
    return o, lse


def _backward(do, q, k, v, o, lse, scale, attn_mask, is_causal, widths, bias=None):
    B, H, N, D = q.shape
    M, Dv = k.shape[2], v.shape[3]
    do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H * N == 0 or M == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    R = B * H * N
    br = 32
    _attn_bwd_preprocess[(triton.cdiv(R, br),)](o, do, delta, R, Dv, BLOCK_R=br,
                                                 BLOCK_DV=max(16, triton.next_power_of_2(Dv)))
    mask_t, kend, keep_t, kb, kh = _mask_args(q, attn_mask)
    qkw, vw = widths if widths is not None else (q, q)
    bias_t, bb, hb = _bias_args(q, bias)
    bm, bn, bd, bdv = _blocks(D, Dv, backward=True, N=N, M=M)
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, **_meta(q, attn_mask, is_causal, widths, bias))
    _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(M, bn))](q, k, v, do, lse, delta, dk, dv, mask_t, kend, qkw, vw, bias_t,
                                                       keep_t, H, N, M, D, Dv, float(scale), bb, hb, kb, kh, **meta)
    _attn_bwd_dq_kernel[(B * H, triton.cdiv(N, bm))](q, k, v, do, lse, delta, dq, mask_t, kend, qkw, vw, bias_t,
                                                     keep_t, H, N, M, D, Dv, float(scale), bb, hb, kb, kh, **meta)
    return dq, dk, dv


# Custom ops (namespace ``spp_triton``) so the kernel is an opaque torch op: fake (meta)
# implementations for torch.compile / export, autograd through register_autograd.
@torch.library.custom_op("spp_triton::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  attn_mask: Optional[torch.Tensor], is_causal: bool, qk_widths: Optional[torch.Tensor],
                  v_widths: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, N, Dv) in q's dtype, lse (B, H, N) fp32); q, k, v contiguous, validated."""
    widths = None if qk_widths is None else (qk_widths, v_widths)
    return _forward(q, k, v, scale, attn_mask, is_causal, widths, bias)


@attention_fwd.register_fake
def _(q, k, v, scale, attn_mask, is_causal, qk_widths, v_widths, bias=None):
    B, H, N, _ = q.shape
    return (q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32))


@torch.library.custom_op("spp_triton::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, scale: float, attn_mask: Optional[torch.Tensor], is_causal: bool,
                  qk_widths: Optional[torch.Tensor], v_widths: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the saved out and lse of :func:`attention_fwd` (no bias gradient)."""
    widths = None if qk_widths is None else (qk_widths, v_widths)
    return _backward(do, q, k, v, o, lse, scale, attn_mask, is_causal, widths, bias)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, scale, attn_mask, is_causal, qk_widths, v_widths, bias=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, attn_mask, is_causal, qk_widths, v_widths, bias = inputs
    o, lse = output
    # the masks, widths and bias saved like q, k, v: an in-place change before the backward raises
    ctx.save_for_backward(q, k, v, o, lse, attn_mask, qk_widths, v_widths, bias)
    ctx.scale, ctx.is_causal = scale, is_causal


def _backward_rule(ctx, do, dlse):  # lse is an auxiliary output: its gradient is ignored
    q, k, v, o, lse, attn_mask, qk_widths, v_widths, bias = ctx.saved_tensors
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.scale, attn_mask, ctx.is_causal, qk_widths, v_widths,
                               bias)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton flash attention with the semantics of :func:`spp_kernels.reference.attention`.

    q: (B, H, N, D); k: (B, H, M, D); v: (B, H, M, Dv) (fp32/fp16/bf16, any widths, D != Dv
    allowed); scale: explicit; attn_mask: None, (B, M) bool key padding (True = attend), or a bool
    (B | 1, H | 1, N, M) mask read per tile (the keys no query of a batch row attends are its
    padding: never loaded, and skipped past the row's last attended key);
    is_causal: query i attends keys j <= i + (M - N) (with a mask too: a key must pass both);
    bias: None or a finite float (Bb, Hb, N, M) added to the scaled scores (batch row b adds
    ``bias[b % Bb]``, Hb in {1, H}), read per tile, never tiled to the batch in memory.
    Returns (B, H, N, Dv) in q's dtype; differentiable w.r.t. q, k, v (not the bias: one that
    requires grad is refused here, and :func:`dispatch_attention` sends it to the torch backend).
    Rows with no key to attend give 0 and 0 gradients."""
    reference.check_attention(q, k, v, scale, attn_mask, is_causal, bias)
    _check_device(q)
    _check_bias_grad(bias)
    return attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), float(scale),
                         attn_mask, is_causal, None, None, bias)[0]


def _bias_needs_grad(bias: Optional[torch.Tensor]) -> bool:
    return bias is not None and bias.requires_grad and torch.is_grad_enabled()


def _check_bias_grad(bias: Optional[torch.Tensor]) -> None:
    if _bias_needs_grad(bias):
        raise ValueError("the Triton attention kernel does not differentiate the bias: detach it, or use "
                         "spp_kernels.attention (which sends such calls to the torch backend)")


def _check_device(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"q must be a CUDA tensor for the Triton attention kernel, got {q.device.type} "
                         "(on CPU set TRITON_INTERPRET=1 before importing triton, or use spp_kernels.attention)")


def _check_widths(name: str, w, H: int, limit: int, device) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor of shape (heads,), got {type(w).__name__}"
                        + (f" {w.dtype}" if isinstance(w, torch.Tensor) else ""))
    if w.shape != (H,):
        raise ValueError(f"{name} must have shape (heads,) = ({H},), got {tuple(w.shape)}")
    if w.numel() and (int(w.min()) < 0 or int(w.max()) > limit):
        raise ValueError(f"{name} must lie in [0, {limit}], got min {int(w.min())}, max {int(w.max())}")
    return w.to(device=device, dtype=torch.int32).contiguous()


def attention_ragged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     qk_widths: torch.Tensor, v_widths: torch.Tensor,
                     attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`attention` with a width per head (per-head pruning): head h uses only its first
    ``qk_widths[h]`` q/k channels and ``v_widths[h]`` v channels; the channels beyond are read as
    zero (so they get zero output and zero gradient). q, k, v are padded to the widest head.

    qk_widths, v_widths: int32/int64 (H,) with 0 <= width <= D (resp. Dv)."""
    reference.check_attention(q, k, v, scale, attn_mask, is_causal, bias)
    _check_device(q)
    _check_bias_grad(bias)
    H = q.shape[1]
    qkw = _check_widths("qk_widths", qk_widths, H, q.shape[3], q.device)
    vw = _check_widths("v_widths", v_widths, H, v.shape[3], q.device)
    return attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), float(scale),
                         attn_mask, is_causal, qkw, vw, bias)[0]


def sdpa_is_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                 is_causal: bool) -> bool:
    """Whether PyTorch SDPA's fast (flash / memory-efficient) CUDA kernels accept these shapes:
    fp16/bf16, equal qk and v widths, a width that is a multiple of 8 and at most 256, and no
    key-padding mask (a boolean mask sends flash to the slower paths, and rows with no key would
    need fixing up afterwards). ``is_causal`` with N == M is fine; causal with N != M is not
    (SDPA aligns its diagonal top-left, the reference bottom-right)."""
    D, Dv = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if D != Dv or D % 8 != 0 or D > 256:
        return False
    if attn_mask is not None:
        return False
    if is_causal and q.shape[2] != k.shape[2]:
        return False
    return True


def dispatch_attention(q, k, v, scale, attn_mask=None, is_causal=False, bias=None):
    """The ``triton`` backend of ``spp_kernels.attention``: SDPA where its fast kernels take the
    shapes (on CUDA), our kernel elsewhere (and always on CPU, where only the interpreter runs).
    With a ``bias``: our kernel (which reads it per tile; SDPA would need it tiled to the batch),
    except where the bias requires grad, which the torch backend computes."""
    reference.check_attention(q, k, v, scale, attn_mask, is_causal, bias)
    if _bias_needs_grad(bias):
        return reference.sdpa_attention(q, k, v, scale, attn_mask, is_causal, bias)
    if bias is None and q.device.type == "cuda" and sdpa_is_fast(q, k, v, attn_mask, is_causal):
        return reference.sdpa_attention(q, k, v, scale, attn_mask, is_causal)
    return attention(q, k, v, scale, attn_mask, is_causal, bias)


dispatch.register("attention", "triton", dispatch_attention, devices=("cuda",),
                  forced_devices=("cpu",) if INTERPRET else ())
