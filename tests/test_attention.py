"""Fused attention kernel (kernels/attention.py) against the fp64 reference (mlmfast/attention.py).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), in fp32 and fp16
(bf16 arithmetic is GPU-only there). On a CUDA machine the same tests run on the GPU; `-m gpu` adds bf16, long
sequences, a no-host-sync check and torch.compile with inductor.

Accuracy rule (flash-attention style): with ref = the fp64 reference and pt = the reference computed in the
test dtype, |kernel - ref|.max() <= FACTOR * |pt - ref|.max() + FLOOR[dtype]; the same for every gradient.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

pytest.importorskip("triton")

import mlmfast.attention as attn_mod  # noqa: E402
from mlmfast.attention import attention, attention_reference, padding_keep  # noqa: E402
from mlmfast.errors import UserError  # noqa: E402

# ---- tolerances: one table ------------------------------------------------------------------------------
FACTOR = 2.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
if torch.cuda.is_available():
    # on a GPU, fp32 inputs run TF32 dots, and Triton feeds the tensor cores raw fp32 bits (no cvt.rna in its PTX):
    # the low 13 mantissa bits are truncated. Simulated over this file's shapes: up to 2.7e-3 (out), 5.7e-3 (grads)
    FLOOR[torch.float32], GRAD_FLOOR[torch.float32] = 5e-3, 1e-2
# two runs of the kernel with different tiles: exact fp32 under the interpreter; TF32 on a GPU rounds P relative to
# the running row maximum, which depends on the tile (simulated differences up to 6e-4)
TILE_ATOL = 1e-5 if not torch.cuda.is_available() else 2e-3

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1")

if DEVICE is not None:
    import mlmfast.kernels.attention as K  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the comparison."""
    if DEVICE is not None:
        monkeypatch.setattr(K, "POISON_OUTPUTS", True)


# ---- helpers --------------------------------------------------------------------------------------------
def _inputs(B, H, L, D, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _seqlens(B, L, seed=0):
    """Per-row lengths including 1 and L."""
    g = torch.Generator().manual_seed(seed + 1)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0] = L
    if B > 1:
        lens[1] = 1
    return lens


def _run(fn, q, k, v, do, **kw):
    """(out, dq, dk, dv) of fn with q, k, v as leaves."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return out.detach(), dq, dk, dv


def _check_close(fast, ref, pt, dtype, what=""):
    names = ("out", "dq", "dk", "dv")
    for name, f, r, p in zip(names, fast, ref, pt):
        assert torch.isfinite(f).all(), f"{what} {name}: non-finite values"
        err = (f.double().cpu() - r.double().cpu()).abs().max().item()
        err_pt = (p.double().cpu() - r.double().cpu()).abs().max().item()
        floor = FLOOR[dtype] if name == "out" else GRAD_FLOOR[dtype]
        assert err <= FACTOR * err_pt + floor, f"{what} {name}: err {err:.3g} > {FACTOR} * {err_pt:.3g} + {floor}"


def _compare(B, H, L, D, dtype, device=DEVICE, data_seed=0, **kw):
    """Kernel (via attention) vs the fp64 reference and the low-precision reference; returns the kernel's results."""
    q, k, v = _inputs(B, H, L, D, dtype, data_seed, device)
    do = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(data_seed + 7)).to(device=device, dtype=dtype)
    fast = _run(attention, q, k, v, do, **kw)
    ref_kw = {k_: v_ for k_, v_ in kw.items() if k_ != "seed"}
    if kw.get("dropout_p", 0.0) > 0.0:
        ref_kw["dropout_mask"] = K.dropout_mask(B, H, L, kw["dropout_p"], kw["seed"], device)
    ref_dev = device  # fp64 / low-precision references on the same device (CPU supports fp16 matmul)
    to = lambda x, dt: x.detach().to(device=ref_dev, dtype=dt)  # noqa: E731
    ref_kw = {k_: (v_.to(ref_dev) if isinstance(v_, torch.Tensor) else v_) for k_, v_ in ref_kw.items()}
    ref = _run(attention_reference, to(q, torch.float64), to(k, torch.float64), to(v, torch.float64),
               to(do, torch.float64), **ref_kw)
    pt_dtype = dtype
    pt = _run(attention_reference, to(q, pt_dtype), to(k, pt_dtype), to(v, pt_dtype), to(do, pt_dtype), **ref_kw)
    _check_close(fast, ref, pt, dtype, what=f"B={B} H={H} L={L} D={D} {dtype} {sorted(kw)}")
    return fast


def _pad_keep(B, L, kw, device=DEVICE):
    keep = padding_keep(B, L, kw.get("seqlens"), kw.get("key_padding_mask"), device)
    return torch.ones(B, L, dtype=torch.bool, device=device) if keep is None else keep


# ---- accuracy: the shapes -----------------------------------------------------------------------
SHAPES = [(L, D) for L in (1, 17, 127, 129) for D in (32, 64)] + [(256, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("L,D", SHAPES)
def test_matches_fp64_reference_with_seqlens(L, D, dtype):
    B, H = 3, 2
    kw = dict(seqlens=_seqlens(B, L, seed=L).to(DEVICE))
    out, dq, dk, dv = _compare(B, H, L, D, dtype, data_seed=L + D, **kw)
    keep = _pad_keep(B, L, kw)[:, None, :, None].expand_as(out)
    # padded query rows: output and dq exactly 0; padded keys: dk, dv exactly 0
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert (t[~keep] == 0).all(), f"{name} not exactly 0 on padding"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_no_padding(dtype):
    _compare(2, 2, 129, 64, dtype, data_seed=3)


def test_key_padding_mask_any_pattern():
    """Left padding, holes, an all-padding row, and a mask combined with seqlens."""
    B, H, L, D = 4, 2, 77, 32
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(B, L, generator=g) > 0.4  # holes everywhere
    mask[1] = False
    mask[1, 30:] = True  # left padding (lo = 30, not block-aligned)
    mask[2] = False  # all padding
    mask[3, :] = True
    mask[3, 50:60] = False
    mask = mask.to(DEVICE)
    for kw in (dict(key_padding_mask=mask), dict(key_padding_mask=mask, seqlens=torch.tensor([77, 60, 5, 55]))):
        kw = {k_: v_.to(DEVICE) for k_, v_ in kw.items()}
        out, dq, dk, dv = _compare(B, H, L, D, torch.float32, data_seed=11, **kw)
        keep = _pad_keep(B, L, kw)[:, None, :, None].expand_as(out)
        for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert (t[~keep] == 0).all(), f"{name} not exactly 0 on padding"
        assert (out[2] == 0).all() and (dk[2] == 0).all()


def test_key_padding_mask_equals_seqlens():
    B, H, L, D = 3, 2, 70, 32
    q, k, v = _inputs(B, H, L, D, torch.float32)
    lens = torch.tensor([70, 1, 33], device=DEVICE)
    mask = torch.arange(L, device=DEVICE)[None, :] < lens[:, None]
    a = attention(q, k, v, seqlens=lens)
    b = attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_padding_is_never_read():
    """NaN in every padded position of q, k, v and dO changes nothing: padded key blocks are skipped and the
    partial blocks masked on load, not merely masked after a multiply."""
    B, H, L, D = 3, 2, 100, 32
    lens = torch.tensor([100, 1, 37], device=DEVICE)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[2, :20] = False  # plus left padding in row 2
    q, k, v = _inputs(B, H, L, D, torch.float32)
    do = torch.randn(B, H, L, D, device=DEVICE)
    keep = padding_keep(B, L, lens, mask, DEVICE)[:, None, :, None].expand(B, H, L, D)
    clean = _run(attention, q, k, v, do, seqlens=lens, key_padding_mask=mask)
    dirty_inputs = [x.masked_fill(~keep, float("nan")) for x in (q, k, v, do)]
    dirty = _run(attention, *dirty_inputs, seqlens=lens, key_padding_mask=mask)
    for c, d in zip(clean, dirty):
        assert torch.equal(c, d)


def test_padded_blocks_are_skipped_not_masked():
    """With 1/8 of the keys kept the kernels visit ~1/8 of the blocks: the interpreter's run time shows it."""
    if DEVICE != "cpu":
        pytest.skip("interpreter timing proxy; on a GPU see benchmarks/bench_attention.py --padding")
    B, H, L, D = 1, 1, 512, 16
    q, k, v = _inputs(B, H, L, D, torch.float32)

    def best(lens):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            attention(q, k, v, seqlens=lens)
            times.append(time.perf_counter() - t0)
        return min(times)

    full, short = best(torch.tensor([L])), best(torch.tensor([L // 8]))
    assert short * 2.5 < full, f"padded run {short:.3f}s vs full {full:.3f}s: padded blocks are not skipped"


def test_fully_padded_batch():
    B, H, L, D = 2, 1, 20, 16
    q, k, v = _inputs(B, H, L, D, torch.float32)
    do = torch.randn(B, H, L, D, device=DEVICE)
    for t in _run(attention, q, k, v, do, seqlens=torch.zeros(B, dtype=torch.int64, device=DEVICE)):
        assert (t == 0).all()


@pytest.mark.parametrize("D", [16, 80, 128])
def test_other_head_dims(D):
    """D = 16 (smallest tile), 80 (padded to 128 with masked loads), 128."""
    _compare(2, 1, 40, D, torch.float32, data_seed=D, seqlens=torch.tensor([40, 13], device=DEVICE))


def test_small_blocks_many_iterations(monkeypatch):
    """Force 16 x 16 blocks so every loop split (partial first / full / partial last block) runs many times,
    with left padding, holes, and dropout (the draws do not depend on the block sizes)."""
    B, H, L, D = 2, 2, 75, 32
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :21] = False
    mask[0, 40:44] = False
    mask[1, 61:] = False
    kw = dict(key_padding_mask=mask.to(DEVICE), dropout_p=0.25, seed=1234)
    default = _compare(B, H, L, D, torch.float32, data_seed=2, **kw)
    small = K.KernelConfig(16, 16, 4, 1)
    monkeypatch.setattr(K, "kernel_config", lambda *a, **k_: small)
    forced = _compare(B, H, L, D, torch.float32, data_seed=2, **kw)
    for a, b in zip(default, forced):
        torch.testing.assert_close(a, b, atol=TILE_ATOL, rtol=0)


# ---- dropout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_matches_reference_with_same_mask(dtype):
    """Forward and all gradients equal the reference run with the kernel's own mask: the backward regenerates
    exactly the forward's draws."""
    _compare(2, 2, 67, 32, dtype, data_seed=4, seqlens=torch.tensor([67, 30], device=DEVICE), dropout_p=0.3,
             seed=2024)


def test_padding_bounds_flag_rows_whose_mask_has_holes():
    """bounds[b] = (lo, hi, holes): holes = 1 only when the mask drops a position inside [lo, hi) (then the
    kernels read it in full blocks); right / left padding, full and empty rows have none."""
    L = 40
    mask = torch.zeros(5, L, dtype=torch.bool)
    mask[0, :30] = True  # right padding
    mask[1, 10:] = True  # left padding
    mask[2, 5:35] = True
    mask[2, 20] = False  # a hole
    mask[4] = True  # row 3: all padding; row 4: full
    bounds, kmask = K.padding_bounds(5, L, None, mask.to(DEVICE), torch.device(DEVICE))
    assert bounds.tolist() == [[0, 30, 0], [10, 40, 0], [5, 35, 1], [0, 0, 0], [0, 40, 0]]
    assert torch.equal(kmask.cpu().bool(), mask)
    # seqlens cut the rows first: row 2's hole lies past its length 20 -> none left; row 0 cut to 25
    bounds, _ = K.padding_bounds(5, L, torch.tensor([25, 40, 20, 40, 40]), mask.to(DEVICE), torch.device(DEVICE))
    assert bounds.tolist() == [[0, 25, 0], [10, 40, 0], [5, 20, 0], [0, 0, 0], [0, 40, 0]]
    bounds, kmask = K.padding_bounds(5, L, torch.tensor([25, 40, 20, 40, 40]), None, torch.device(DEVICE))
    assert kmask is None and bounds[:, 2].tolist() == [0] * 5


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_a_padding_only_mask_runs_like_seqlens(dropout_p):
    """A right-padded key_padding_mask (holes = 0) takes the seqlens path in full blocks: the same output and
    gradients, bit for bit, as passing the lengths, with and without dropout; a mask with a hole in a full block
    still matches the fp64 reference (the kernels read it there)."""
    B, H, L, D = 3, 2, 129, 32
    q, k, v = _inputs(B, H, L, D, torch.float32)
    do = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    lens = torch.tensor([129, 70, 17])
    mask = torch.arange(L)[None, :] < lens[:, None]
    a = _run(attention, q, k, v, do, key_padding_mask=mask.to(DEVICE), dropout_p=dropout_p, seed=11)
    b = _run(attention, q, k, v, do, seqlens=lens.to(DEVICE), dropout_p=dropout_p, seed=11)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    holed = mask.clone()
    holed[0, 64:80] = False  # a hole spanning whole 16-key blocks in the middle of row 0
    _compare(B, H, L, D, torch.float32, key_padding_mask=holed.to(DEVICE), dropout_p=dropout_p, seed=11)


def test_dropout_tiny_shapes():
    """L = 1 and H = 1 (integer arguments equal to 1 become constexprs when the GPU JIT compiles)."""
    _compare(2, 1, 1, 16, torch.float32, data_seed=9, dropout_p=0.5, seed=1)
    _compare(1, 1, 9, 16, torch.float32, data_seed=9, dropout_p=0.5, seed=1)


def test_dropout_keep_rate_and_seeds():
    B, H, L, p = 2, 2, 64, 0.2
    m = K.dropout_mask(B, H, L, p, 7, DEVICE)
    n = m.numel()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(m.sum().item() - n * (1 - p)) < 5 * sigma
    assert torch.equal(m, K.dropout_mask(B, H, L, p, 7, DEVICE))  # same seed, same mask
    other = K.dropout_mask(B, H, L, p, 8, DEVICE)
    assert (m != other).float().mean().item() > 0.2  # another seed, another mask
    # heads and rows get different draws (no repeated stream)
    assert not torch.equal(m[0, 0], m[0, 1]) and not torch.equal(m[0, 0], m[1, 0])
    assert not torch.equal(m[0, 0, 0], m[0, 0, 1])
    # keep rate per key column and per query row is unbiased too (each Philox call feeds 2 rows x 4 keys)
    for rate in (m.float().mean(dim=(0, 1, 2)), m.float().mean(dim=(0, 1, 3))):
        assert (rate - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / (B * H * L))
    # neighbours inside one Philox call (rows i, i + 8; keys j, j + 1, j + 8) and across calls agree as often as
    # independent draws do (a draw shared by two elements would make them agree always)
    same = p * p + (1 - p) * (1 - p)
    for a, b in ((m[:, :, :-8], m[:, :, 8:]), (m[..., :-1], m[..., 1:]), (m[..., :-8], m[..., 8:]),
                 (m[..., :-2], m[..., 2:]), (m[:, :, :-1], m[:, :, 1:])):
        agree = (a == b).float().mean().item()
        assert abs(agree - same) < 6 * math.sqrt(same * (1 - same) / a.numel()), agree


@pytest.mark.parametrize("B,H,L,p,seed", [(1, 1, 1, 0.5, 3), (2, 3, 17, 0.2, 7), (1, 2, 127, 0.1, 2**40 + 5),
                                          (1, 1, 129, 0.3, -9), (2, 1, 64, 0.9, 2**63 + 11)])
def test_dropout_mask_matches_the_documented_draw_layout(B, H, L, p, seed):
    """The kernels' mask equals a plain-PyTorch recomputation of the documented Philox-4x32-7 draw layout
    (counter per row pair x 16-key group x quad): checks the kernels' index arithmetic independently."""
    assert torch.equal(K.dropout_mask(B, H, L, p, seed, DEVICE).cpu(), K.dropout_mask_reference(B, H, L, p, seed))


def test_dropout_same_seed_same_result():
    B, H, L, D = 2, 1, 33, 16
    q, k, v = _inputs(B, H, L, D, torch.float32)
    do = torch.randn(B, H, L, D, device=DEVICE)
    a = _run(attention, q, k, v, do, dropout_p=0.5, seed=99)
    b = _run(attention, q, k, v, do, dropout_p=0.5, seed=99)
    c = _run(attention, q, k, v, do, dropout_p=0.5, seed=100)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    # a seed tensor gives the same draws as the int
    t = _run(attention, q, k, v, do, dropout_p=0.5, seed=torch.tensor(99, device=DEVICE))
    assert torch.equal(a[0], t[0])
    # seed=None draws from torch's generator: reproducible under torch.manual_seed
    torch.manual_seed(0)
    n1 = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    n2 = attention(q, k, v, dropout_p=0.5)
    assert torch.equal(n1, n2)


def test_dropout_expectation():
    """E[out] over draws approaches the no-dropout output (the 1 / (1 - p) scaling): 64 batch rows holding the
    same q, k, v get independent draws."""
    B, H, L, D = 64, 1, 16, 16
    q, k, v = (x[:1].expand(B, H, L, D) for x in _inputs(1, H, L, D, torch.float32))
    ref = attention(q[:1], k[:1], v[:1])
    mean = attention(q, k, v, dropout_p=0.2, seed=5).mean(0, keepdim=True)
    assert (mean - ref).abs().max().item() < 0.15


# ---- determinism, layouts, API ------------------------------------------------------------------------
def test_backward_is_deterministic():
    B, H, L, D = 2, 2, 90, 32
    q, k, v = _inputs(B, H, L, D, torch.float16)
    do = torch.randn(B, H, L, D, device=DEVICE, dtype=torch.float16)
    a = _run(attention, q, k, v, do, seqlens=torch.tensor([90, 41], device=DEVICE))
    b = _run(attention, q, k, v, do, seqlens=torch.tensor([90, 41], device=DEVICE))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_blhd_views_need_no_copy():
    """[B, L, H, D] storage passed as .transpose(1, 2): same result, outputs and grads in [B, L, H, D] storage."""
    B, H, L, D = 2, 3, 33, 32
    q, k, v = _inputs(B, H, L, D, torch.float32)
    do = torch.randn(B, H, L, D, device=DEVICE)
    base = _run(attention, q, k, v, do, seqlens=torch.tensor([33, 20], device=DEVICE))
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    qt, kt, vt = (x.detach().requires_grad_() for x in (qt, kt, vt))
    out = attention(qt, kt, vt, seqlens=torch.tensor([33, 20], device=DEVICE))
    assert out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out, (qt, kt, vt), do)
    for g in grads:
        assert g.transpose(1, 2).is_contiguous()
    for x, y in zip(base, (out.detach(),) + grads):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    # a fused qkv [B, L, 3, H, D] sliced into views, and a non-unit last stride
    qkv = torch.stack([q, k, v], dim=2).transpose(1, 3).contiguous()  # (B, L, 3, H, D)
    o2 = attention(qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2),
                   seqlens=torch.tensor([33, 20], device=DEVICE))
    torch.testing.assert_close(o2, base[0], atol=1e-6, rtol=0)
    qs = torch.randn(B, H, L, 2 * D, device=DEVICE)[..., ::2]
    torch.testing.assert_close(attention(qs, k, v), attention(qs.contiguous(), k, v), atol=0, rtol=0)


def test_softmax_scale():
    _compare(1, 2, 30, 32, torch.float32, softmax_scale=0.3)


def test_custom_ops_opcheck():
    B, H, L, D = 1, 2, 20, 16
    q, k, v = _inputs(B, H, L, D, torch.float32)
    bounds, kmask = K.padding_bounds(B, L, torch.tensor([13], device=DEVICE), None, torch.device(DEVICE))
    for args in ((q, k, v, bounds, kmask, None, 0.0, 0.25),
                 (q, k, v, bounds, None, torch.tensor([3], device=DEVICE), 0.1, 0.25)):
        args = tuple(a.requires_grad_() if i < 3 else a for i, a in enumerate(args))
        torch.library.opcheck(torch.ops.mlmfast.attention_fwd.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("kw", [dict(seqlens=[20, 7]), dict(mask=True), dict(mask=True, dropout_p=0.2, seed=4)],
                         ids=["seqlens", "mask", "mask+dropout"])
def test_eager_function_equals_custom_op(kw, monkeypatch):
    """Eager calls on plain tensors take a lighter autograd.Function (less launch cost); torch.compile and
    subclasses take the custom op. Same kernels, same arguments: bit-identical outputs and gradients."""
    B, H, L, D = 2, 2, 20, 16
    q, k, v = _inputs(B, H, L, D, torch.float32, seed=3)
    do = torch.randn(B, H, L, D, device=DEVICE)
    call = {}
    if "seqlens" in kw:
        call["seqlens"] = torch.tensor(kw["seqlens"], device=DEVICE)
    if kw.get("mask"):
        keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
        keep[0, 3:6] = False
        keep[1, 11:] = False
        call["key_padding_mask"] = keep
    if "dropout_p" in kw:
        call.update(dropout_p=kw["dropout_p"], seed=kw["seed"])
    used = []
    real_fn, real_op = K._EagerAttention.apply, K._attention_fwd_op
    monkeypatch.setattr(K._EagerAttention, "apply", lambda *a: used.append("fn") or real_fn(*a))
    monkeypatch.setattr(K, "_attention_fwd_op", lambda *a: used.append("op") or real_op(*a))
    eager = _run(attention, q, k, v, do, **call)
    monkeypatch.setattr(K, "_plain_eager", lambda *t: False)
    op = _run(attention, q, k, v, do, **call)
    assert used == ["fn", "op"]
    for name, x, y in zip(("out", "dq", "dk", "dv"), eager, op):
        assert torch.equal(x, y), name


def test_padding_bounds_are_reused_while_the_mask_is_unchanged(monkeypatch):
    """The layers of a model pass one mask tensor: its bounds are computed once, and again only for another
    tensor or after an in-place change (version counter): never a stale result."""
    B, H, L, D = 2, 1, 12, 16
    q, k, v = _inputs(B, H, L, D, torch.float32)
    calls = []
    real = K.padding_bounds
    monkeypatch.setattr(K, "padding_bounds", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(K, "_BOUNDS_CACHE", [])
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[1, 5:] = False
    a = attention(q, k, v, key_padding_mask=keep)
    b = attention(q, k, v, key_padding_mask=keep)
    assert len(calls) == 1 and torch.equal(a, b)
    keep[0, 8:] = False  # in place: the cached bounds would be stale
    c = attention(q, k, v, key_padding_mask=keep)
    assert len(calls) == 2
    torch.testing.assert_close(c, attention_reference(q, k, v, key_padding_mask=keep), atol=1e-5, rtol=0)
    attention(q, k, v, key_padding_mask=keep.clone())  # another tensor, equal values: computed again
    lens = torch.tensor([12, 5], device=DEVICE)
    attention(q, k, v, seqlens=lens)
    attention(q, k, v, seqlens=lens)
    assert len(calls) == 4
    with torch.inference_mode():  # no version counter there: never cached
        m = keep.clone()
        attention(q, k, v, key_padding_mask=m)
        attention(q, k, v, key_padding_mask=m)
    assert len(calls) == 6


def test_torch_compile_fullgraph():
    """Traces without graph breaks (custom ops with fakes); aot_eager keeps the run cheap on CPU."""
    _check_compile_fullgraph("inductor" if DEVICE == "cuda" else "aot_eager", DEVICE)


def _check_compile_fullgraph(backend, device):
    B, H, L, D = 2, 2, 24, 16
    q, k, v = (x.requires_grad_() for x in _inputs(B, H, L, D, torch.float32, device=device))
    lens = torch.tensor([24, 9], device=device)

    def f(q, k, v, lens):
        return attention(q, k, v, seqlens=lens, dropout_p=0.1, seed=5).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    loss = compiled(q, k, v, lens)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v, lens)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_reference_path_semantics(monkeypatch):
    """Without the kernel (no triton / no GPU and no interpreter) attention() runs the reference: same
    semantics, padded query rows exactly 0, seeded dropout reproducible."""
    monkeypatch.setattr(attn_mod, "_INTERPRET", False)
    B, H, L, D = 2, 2, 19, 16
    q, k, v = (x.cpu() for x in _inputs(B, H, L, D, torch.float32))
    lens = torch.tensor([19, 4])
    out = attention(q, k, v, seqlens=lens)
    assert (out[1, :, 4:] == 0).all()
    a = attention(q, k, v, seqlens=lens, dropout_p=0.3, seed=3)
    b = attention(q, k, v, seqlens=lens, dropout_p=0.3, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, out)


def test_input_validation():
    q, k, v = _inputs(1, 1, 8, 16, torch.float32)
    with pytest.raises(UserError):
        attention(q[0], k[0], v[0])
    with pytest.raises(UserError):
        attention(q, k[:, :, :4], v)
    with pytest.raises(UserError):
        attention(q, k.half(), v)
    with pytest.raises(UserError):
        attention(q, k, v, dropout_p=1.0)
    with pytest.raises(UserError):
        attention(q, k, v, seqlens=torch.tensor([1.0]))
    with pytest.raises(UserError):
        attention(q, k, v, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(UserError):
        attention(q, k, v, softmax_scale=0.0)


def test_dispatch_status():
    from mlmfast import dispatch

    st = {s.name: s for s in dispatch.all_status()}["attention"]
    assert st.available, st.reason
    assert "Triton" in st.fast


def test_module_is_callable():
    import mlmfast

    torch.testing.assert_close(mlmfast.attention(*_inputs(1, 1, 5, 16, torch.float32)),
                               attention(*_inputs(1, 1, 5, 16, torch.float32)))


# ---- GPU only -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("L,D", [(512, 64), (1000, 128), (2048, 64), (4096, 128), (333, 80), (257, 96),
                                 (129, 16), (300, 32)])
def test_gpu_matches_reference(cuda_device, dtype, L, D):
    B, H = 2, 2
    lens = _seqlens(B, L, seed=L).to(cuda_device)
    _compare(B, H, L, D, dtype, device="cuda", data_seed=L, seqlens=lens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_mask_and_dropout(cuda_device, dtype):
    B, H, L, D = 3, 4, 700, 64
    mask = (torch.rand(B, L, generator=torch.Generator().manual_seed(5)) > 0.3).to("cuda")
    mask[1, :200] = False
    _compare(B, H, L, D, dtype, device="cuda", data_seed=1, key_padding_mask=mask, dropout_p=0.1, seed=77)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor(cuda_device):
    """The custom ops under inductor on the GPU: no graph break, compiled loss and grads equal eager."""
    _check_compile_fullgraph("inductor", cuda_device)


@pytest.mark.gpu
def test_gpu_no_host_sync(cuda_device):
    B, H, L, D = 4, 8, 512, 64
    q, k, v = (x.requires_grad_() for x in _inputs(B, H, L, D, torch.bfloat16, device="cuda"))
    lens = torch.randint(1, L + 1, (B,), device="cuda")
    mask = torch.rand(B, L, device="cuda") > 0.2
    attention(q, k, v, seqlens=lens, key_padding_mask=mask, dropout_p=0.1).sum().backward()  # warm up / compile
    attention(q, k, v, seqlens=lens, dropout_p=0.1, seed=3).sum().backward()  # the no-mask variant too
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attention(q, k, v, seqlens=lens, key_padding_mask=mask, dropout_p=0.1)
        out.sum().backward()
        out = attention(q, k, v, seqlens=lens, dropout_p=0.1, seed=3)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_with_a_reused_mask(cuda_device):
    """A CUDA graph captured with a mask that was used eagerly before (a padding-bounds cache hit outside the
    capture) replays correctly after other masks have been used: the capture computes its own bounds."""
    B, H, L, D = 2, 4, 128, 64
    q, k, v = _inputs(B, H, L, D, torch.bfloat16, device="cuda")
    keep = torch.ones(B, L, dtype=torch.bool, device="cuda")
    keep[1, 70:] = False
    attention(q, k, v, key_padding_mask=keep)  # eager: compiles, and caches the bounds of `keep`
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        attention(q, k, v, key_padding_mask=keep)  # warm-up on the capture stream
        with torch.cuda.graph(graph):
            out = attention(q, k, v, key_padding_mask=keep)
    torch.cuda.current_stream().wait_stream(stream)
    other = torch.ones(B, L, dtype=torch.bool, device="cuda")
    other[0, 5:] = False
    for _ in range(3):  # evict whatever is cached
        attention(q, k, v, key_padding_mask=other.clone())
    # then take the small blocks a freed bounds [B, 3] / mask [B, L] tensor would have left, and fill them
    junk = [torch.full((B, L), 7, dtype=torch.int32, device="cuda") for _ in range(64)]
    graph.replay()
    torch.cuda.synchronize()
    ref = attention_reference(q.float(), k.float(), v.float(), key_padding_mask=keep)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
    del junk


@pytest.mark.gpu
def test_gpu_compile_check_runs_there(cuda_device):
    """The compile check also passes with the GPU machine's triton (a subset, for time)."""
    import subprocess
    import sys

    env = {k_: v_ for k_, v_ in os.environ.items() if k_ != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mlmfast.kernels.compile_check", "--arch", "90",
                           "--head-dims", "64", "128", "--dtypes", "bfloat16", "--jobs", "4"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_row_offsets_that_would_overflow_int32_are_copied():
    """The kernels form row * row_stride in int32: a layout where that wraps is made contiguous first (meta
    tensors: no memory needed for the shapes involved)."""
    big = torch.empty_strided((1, 1, 20000, 64), (0, 0, 2**17, 1), device="meta")  # rows 2^17 elements apart
    assert K._unit_last_stride(big).is_contiguous()
    ok = torch.empty_strided((1, 1, 2000, 64), (0, 0, 2**17, 1), device="meta")
    assert K._unit_last_stride(ok) is ok
    blhd = torch.empty((1, 131072, 128, 128), device="meta").transpose(1, 2)  # H * D = 16384 per row
    assert K._alloc_like(blhd).is_contiguous()
    small = torch.empty((1, 512, 12, 64), device="meta").transpose(1, 2)
    assert K._is_blhd(K._alloc_like(small))


def test_host_launch_helpers_equal_tritons():
    """cdiv / next_power_of_2 / block_d on plain ints (triton's are ConstexprFunctions: 1-3 us a call on the
    host, several calls per launch) agree with triton's own; kernel_config is cached per argument tuple."""
    import triton

    from mlmfast.kernels import _launch
    from mlmfast.kernels import attention as K

    for a in range(0, 300):
        for b in (1, 3, 16, 64, 128):
            assert _launch.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in range(1, 1025):
        assert _launch.next_power_of_2(n) == triton.next_power_of_2(n), n
    assert [K.block_d(d) for d in (1, 16, 17, 64, 80, 96, 128)] == [16, 16, 32, 64, 128, 128, 128]
    assert K.kernel_config("dkdv", 64, torch.bfloat16, 90) is K.kernel_config("dkdv", 64, torch.bfloat16, 90)
