"""Fused linear + cross-entropy: the Triton kernels (interpreter on CPU, fp32 / fp16) and the chunked PyTorch twin
against the plain fp64 definition; every gradient, ignored rows, num_active, chunking, splits, the custom ops."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mlmfast.errors import UserError
from mlmfast.linear_ce import (
    _linear_ce_fwd_op,
    linear_ce_backward_torch,
    linear_ce_forward_torch,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# max |fast - fp64 reference| <= ATOL[dtype] + RTOL[dtype] * max |reference|, per output (loss, dx, dW, db)
RTOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
ATOL = {torch.float32: 1e-7, torch.float16: 1e-5, torch.bfloat16: 1e-4}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """NaN-fill every kernel output before the kernels write it (an unwritten element cannot pass)."""
    if HAS_TRITON:
        from mlmfast.kernels import linear_ce as K

        monkeypatch.setattr(K, "POISON_OUTPUTS", True)


def make(n, h, v, dtype, seed=0, ignore_every=3, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.2).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return x, w, b, labels


def grads(loss, tensors):
    loss.backward()
    out = [None if t is None else t.grad.detach().clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


def reference(x, w, b, labels, **kw):
    """fp64 oracle: loss and gradients of the plain definition."""
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    loss = linear_cross_entropy_reference(xr, wr, br, labels, **kw)
    return loss.detach(), grads(loss, [xr, wr, br])


def assert_close(got, ref, dtype, what):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    bound = ATOL[dtype] + RTOL[dtype] * (ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def check(n, h, v, dtype, backend, bias=True, ignore_every=3, reduction="mean", chunk_rows=None, seed=0):
    x, w, b, labels = make(n, h, v, dtype, seed=seed, ignore_every=ignore_every, bias=bias)
    loss = linear_cross_entropy(x, w, b, labels, backend=backend, reduction=reduction, chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    got = grads(loss, [x, w, b])
    ref_loss, ref = reference(x, w, b, labels, reduction=reduction)
    assert_close(loss.detach(), ref_loss, dtype, "loss")
    for name, g, r in zip(("dx", "dW", "db"), got, ref):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert_close(g, r, dtype, name)


# ---- the kernels under the interpreter ------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("n,h,v", [(1, 16, 33), (17, 24, 150), (127, 32, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_fp64(n, h, v, dtype):
    check(n, h, v, dtype, "kernel", ignore_every=3 if n > 1 else 0)


@needs_triton
def test_kernel_no_bias_sum_and_backward_chunks():
    # chunk_rows=64 with 127 rows: two backward chunks (dW accumulated across them, db from both)
    check(127, 24, 90, torch.float32, "kernel", bias=False, reduction="sum", chunk_rows=64)
    check(127, 24, 90, torch.float32, "kernel", chunk_rows=64, seed=1)


@needs_triton
def test_kernel_forward_vocabulary_splits():
    from mlmfast.kernels import linear_ce as K

    x, w, b, labels = make(33, 16, 200, torch.float32)
    n_act = torch.tensor([33])
    ref = K.linear_ce_forward(x.detach(), w.detach(), b.detach(), labels, n_act, -100, True, splits=1)
    for splits in (2, 3, 4):  # 4 tiles of 64 over V=200: the last split is a partial tile
        got = K.linear_ce_forward(x.detach(), w.detach(), b.detach(), labels, n_act, -100, True, splits=splits)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6)
        assert int(got[2]) == int(ref[2]) == int((labels != -100).sum())


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_triton), "torch"])
def test_all_ignored_gives_zero_loss_and_zero_grads(backend):
    x, w, b, _ = make(17, 16, 40, torch.float32)
    labels = torch.full((17,), -100)
    loss = linear_cross_entropy(x, w, b, labels, backend=backend)
    dx, dw, db = grads(loss, [x, w, b])
    assert loss.item() == 0.0
    for g in (dx, dw, db):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_triton), "torch"])
def test_num_active_ignores_the_tail(backend):
    # rows >= num_active count as ignored whatever their labels (the static-capacity compaction relies on it)
    x, w, b, labels = make(40, 16, 50, torch.float32, ignore_every=5)
    loss = linear_cross_entropy(x, w, b, labels, num_active=torch.tensor([23]), backend=backend)
    got = grads(loss, [x, w, b])
    cut = labels.clone()
    cut[23:] = -100
    ref_loss, ref = reference(x, w, b, cut)
    assert_close(loss.detach(), ref_loss, torch.float32, "loss")
    for name, g, r in zip(("dx", "dW", "db"), got, ref):
        assert_close(g, r, torch.float32, name)
    assert torch.equal(got[0][23:], torch.zeros_like(got[0][23:]))


# ---- the PyTorch twin -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,h,v", [(1, 16, 33), (17, 24, 150), (127, 32, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_twin_matches_fp64(n, h, v, dtype):
    check(n, h, v, dtype, "torch", ignore_every=3 if n > 1 else 0, chunk_rows=16)


def test_twin_recomputing_backward_equals_gradient_in_forward():
    x, w, b, labels = make(37, 24, 61, torch.float32)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    loss, lse, count, dx, dw, db = linear_ce_forward_torch(xd, wd, bd, labels, None, -100, True, 8, with_grad=True)
    g = torch.tensor(0.5)
    rx, rw, rb = linear_ce_backward_torch(g, xd, wd, bd, labels, None, lse, count, -100, True, 8)
    torch.testing.assert_close(rx, dx * 0.5, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rw, dw * 0.5, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rb, db * 0.5, rtol=1e-5, atol=1e-7)


def test_upstream_gradient_scales():
    x, w, b, labels = make(9, 8, 20, torch.float32)
    (3.0 * linear_cross_entropy(x, w, b, labels, backend="torch")).backward()
    got = [t.grad.clone() for t in (x, w, b)]
    _, ref = reference(x, w, b, labels)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), 3.0 * r, rtol=1e-5, atol=1e-7)


def test_autocast_and_mixed_dtypes():
    x, w, b, labels = make(13, 16, 30, torch.float32)
    ref = linear_cross_entropy(x, w, b, labels, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(x, w, b, labels, backend="torch")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=3e-2, atol=3e-2)
    mixed = linear_cross_entropy(x, w.detach().half().requires_grad_(), b, labels, backend="torch")  # promoted
    torch.testing.assert_close(mixed, ref, rtol=1e-3, atol=1e-3)


def test_no_grad_forward_keeps_no_gradients():
    x, w, b, labels = make(9, 8, 20, torch.float32)
    with torch.no_grad():
        out = _linear_ce_fwd_op(x, w, b, labels, None, -100, True, False, 0, False)
    assert all(t.numel() == 0 for t in out[3:])


def test_custom_op_opcheck():
    x, w, b, labels = make(9, 8, 20, torch.float32)
    torch.library.opcheck(_linear_ce_fwd_op, (x, w, b, labels, None, -100, True, False, 4, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_arguments_are_user_errors(monkeypatch):
    x, w, b, labels = make(5, 8, 10, torch.float32)
    with pytest.raises(UserError, match="weight shape"):
        linear_cross_entropy(x, w[:, :4], b, labels)
    with pytest.raises(UserError, match="labels shape"):
        linear_cross_entropy(x, w, b, labels[:3])
    with pytest.raises(UserError, match="reduction"):
        linear_cross_entropy(x, w, b, labels, reduction="none")
    with pytest.raises(UserError, match="backend"):
        linear_cross_entropy(x, w, b, labels, backend="cuda")
    import mlmfast.linear_ce as LCE

    monkeypatch.setattr(LCE, "_interpret", lambda: False)
    if HAS_TRITON:
        with pytest.raises(UserError, match="TRITON_INTERPRET"):
            linear_cross_entropy(x, w, b, labels, backend="kernel")


def test_dispatch_reports_linear_ce():
    from mlmfast import dispatch

    names = {s.name for s in dispatch.all_status()}
    assert "linear_ce" in names
    st = dispatch.status("linear_ce")
    assert torch.cuda.is_available() or st.reason  # on a CPU machine it says why the kernel is off


def test_reference_matches_torch_cross_entropy():
    x, w, b, labels = make(11, 8, 20, torch.float64)
    z = F.linear(x, w, b)
    want = F.cross_entropy(z, labels, ignore_index=-100)
    torch.testing.assert_close(linear_cross_entropy_reference(x, w, b, labels), want)


# ---- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernel_matches_fp64(cuda_device, dtype):
    for n, h, v in [(1, 64, 1000), (777, 256, 30522), (4096, 768, 30522)]:
        x, w, b, labels = make(n, h, v, dtype, ignore_every=3 if n > 1 else 0)  # n = 1: its row is live
        x, w, b = (t.detach().to(cuda_device).requires_grad_() for t in (x, w, b))
        lab = labels.to(cuda_device)
        loss = linear_cross_entropy(x, w, b, lab)
        got = grads(loss, [x, w, b])
        ref_loss, ref = reference(x, w, b, lab)
        assert_close(loss.detach(), ref_loss, dtype, f"loss {n}x{h}x{v}")
        for name, g, r in zip(("dx", "dW", "db"), got, ref):
            assert_close(g, r, dtype, f"{name} {n}x{h}x{v}")


@pytest.mark.gpu
def test_cuda_kernel_no_host_sync_and_deterministic(cuda_device):
    x, w, b, labels = make(1000, 128, 5000, torch.bfloat16)
    x, w, b = (t.detach().to(cuda_device).requires_grad_() for t in (x, w, b))
    lab, n_act = labels.to(cuda_device), torch.tensor([700], device=cuda_device)
    linear_cross_entropy(x, w, b, lab, num_active=n_act).backward()  # warm-up: compiles, first-call setup
    for t in (x, w, b):
        t.grad = None
    torch.cuda.synchronize()
    outs = []
    for _ in range(2):
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = linear_cross_entropy(x, w, b, lab, num_active=n_act)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        outs.append([loss.detach().clone()] + [t.grad.clone() for t in (x, w, b)])
        for t in (x, w, b):
            t.grad = None
    for a, c in zip(*outs):
        assert torch.equal(a, c)


# ---- compile for the GPU targets, without a GPU ----------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import sys
from mlmfast.kernels import compile_check as CC
bad = []
for arch in (90, 80):
    for dt in ("bfloat16", "float16", "float32"):
        for kind, fn, sig, cx, opts, var, cfg in CC._linear_ce_specs(dt, arch):
            try:
                c = CC._compile(fn, sig, cx, opts, arch)
                regs, spill = CC._ptxas_usage(c.asm["ptx"], arch)
                smem = int(c.metadata.shared)
                mma = "wgmma" in c.asm["ptx"] if arch == 90 and dt != "float32" else True
                print(kind, dt, arch, "regs", regs, "spill", spill, "smem", smem, "wgmma" if mma else "NO WGMMA")
                if spill or smem > CC.SMEM_LIMIT[arch] or not mma:
                    bad.append((kind, dt, arch))
            except Exception as exc:
                print(kind, dt, arch, "ERROR", type(exc).__name__, str(exc)[:400])
                bad.append((kind, dt, arch))
print("BAD", bad)
sys.exit(1 if bad else 0)
"""


@needs_triton
def test_kernels_compile_for_sm90_and_sm80_without_spills():
    """The four linear-CE kernels compile for sm_90 (with wgmma for 16-bit inputs) and sm_80, fp16 / bf16 / fp32,
    with the launch configurations the host picks, and ptxas reports no register spill."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
