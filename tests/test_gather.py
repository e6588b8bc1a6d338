"""Tests of gather_rows (mlmfast/ops.py, csrc/gather.cu): forward against index_select, backward against
index_add_, out-of-range positions, autograd / opcheck / torch.compile; the CUDA kernel with -m gpu."""
from __future__ import annotations

import pytest
import torch

from mlmfast import ops
from mlmfast.errors import UserError

# forward: a gather is exact on every path. backward: float32 sums rounded once; the reference sums in float64.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(B, L, P, H, dtype, device="cpu", seed=0, dup=True, pos_dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn((B, L, H), generator=g).to(dtype)
    if dup:  # duplicates: mlmfast's unused slots all point to position 0
        pos = torch.randint(0, L, (B, P), generator=g)
    else:
        pos = torch.stack([torch.randperm(L, generator=g)[:P] for _ in range(B)]) if P <= L else None
    return hidden.to(device), pos.to(device=device, dtype=pos_dtype)


def _ref_forward(hidden, pos):
    B, L, H = hidden.shape
    flat = (pos.long() + torch.arange(B, device=pos.device)[:, None] * L).reshape(-1)
    return hidden.reshape(B * L, H).index_select(0, flat)


def _ref_backward(grad, pos, L):
    B, P = pos.shape
    flat = (pos.long() + torch.arange(B, device=pos.device)[:, None] * L).reshape(-1)
    acc = torch.zeros((B * L, grad.shape[1]), dtype=torch.float64, device=grad.device)
    return acc.index_add_(0, flat, grad.double()).reshape(B, L, -1)


def _check(hidden, pos, seed=0):
    B, L, H = hidden.shape
    h = hidden.detach().requires_grad_(True)  # no clone: keep the storage offset (alignment) of `hidden`
    out = ops.gather_rows(h, pos)
    assert out.shape == (B * pos.shape[1], H) and out.dtype == hidden.dtype
    assert torch.equal(out, _ref_forward(hidden, pos))  # a gather is exact
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device=out.device, dtype=out.dtype)
    out.backward(g)
    ref = _ref_backward(g, pos, L)
    err = (h.grad.double() - ref).abs().max().item() if h.grad.numel() else 0.0
    assert err <= ATOL[hidden.dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0), err


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("B,L,P,H", [(1, 1, 1, 1), (2, 17, 5, 33), (3, 127, 48, 64), (1, 129, 129, 8), (4, 8, 20, 7)])
def test_gather_forward_backward(B, L, P, H, dtype):
    hidden, pos = _inputs(B, L, P, H, dtype, seed=B + L + P + H)
    _check(hidden, pos)
    _check(hidden, pos.int())


def test_out_of_range_positions_are_zero_rows_without_gradient():
    hidden, _ = _inputs(2, 5, 3, 4, torch.float32)
    pos = torch.tensor([[0, 5, -1], [4, 4, 100]])
    h = hidden.clone().requires_grad_(True)
    out = ops.gather_rows(h, pos)
    assert torch.equal(out[0], hidden[0, 0]) and (out[1] == 0).all() and (out[2] == 0).all()
    assert torch.equal(out[3], hidden[1, 4]) and torch.equal(out[4], hidden[1, 4]) and (out[5] == 0).all()
    out.sum().backward()
    want = torch.zeros_like(hidden)
    want[0, 0] = 1
    want[1, 4] = 2
    assert torch.equal(h.grad, want)


def test_gradcheck_and_double_backward():
    hidden, pos = _inputs(2, 6, 4, 3, torch.float64, seed=3)
    h = hidden.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.gather_rows(x, pos), (h,))
    assert torch.autograd.gradgradcheck(lambda x: ops.gather_rows(x, pos), (h,))


def test_opcheck_and_compile():
    _check_opcheck_and_compile("cpu", "aot_eager")


def _check_opcheck_and_compile(device, backend):
    """The fakes agree with the real ops (opcheck), and torch.compile(fullgraph=True) runs gather + backward."""
    hidden, pos = _inputs(2, 9, 4, 16, torch.float32, device=device, seed=1)
    torch.library.opcheck(torch.ops.mlmfast.gather_rows.default, (hidden.requires_grad_(True), pos))
    g = torch.randn(8, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mlmfast.scatter_rows.default, (g, pos, 9))

    def f(h, p):
        return (ops.gather_rows(h, p) ** 2).sum()

    h1 = hidden.detach().clone().requires_grad_(True)
    h2 = hidden.detach().clone().requires_grad_(True)
    f(h1, pos).backward()
    torch.compile(f, fullgraph=True, backend=backend)(h2, pos).backward()
    assert torch.equal(h1.grad, h2.grad)


def test_gather_errors():
    hidden, pos = _inputs(2, 5, 3, 4, torch.float32)
    for args, name in [
        ((hidden[0], pos), "hidden"),
        ((hidden.long(), pos), "hidden"),
        ((hidden, pos[0]), "positions"),
        ((hidden, pos.float()), "positions"),
        ((hidden, pos[:1]), "batch"),
    ]:
        with pytest.raises(UserError, match=name):
            ops.gather_rows(*args)


# ---- GPU -------------------------------------------------------------------------------------------------------
def _cuda_part_or_fail():
    ext = ops.extension()
    if ext is None or not ext.WITH_CUDA:
        pytest.fail(f"the CUDA part of mlmfast._C is not built: {ops._cuda_part_reason()}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,P,H", [(1, 1, 1, 1), (2, 17, 5, 33), (8, 128, 48, 768), (4, 512, 128, 1024),
                                     (2, 64, 70, 7), (3, 129, 129, 64)])
def test_cuda_gather(cuda_device, B, L, P, H, dtype):
    _cuda_part_or_fail()
    assert ops.gather_backend(cuda_device, dtype) == "cuda"
    for dup in (True, False):
        if not dup and P > L:
            continue
        for pos_dtype in (torch.long, torch.int32):
            hidden, pos = _inputs(B, L, P, H, dtype, device=cuda_device, seed=H, dup=dup, pos_dtype=pos_dtype)
            _check(hidden, pos, seed=L)
            # bit-identical to the CPU path (float32 sums in ascending slot order, one rounding)
            h = hidden.detach().clone().requires_grad_(True)
            out = ops.gather_rows(h, pos)
            g = torch.randn(out.shape, device=cuda_device).to(dtype)
            out.backward(g)
            hc = hidden.detach().cpu().requires_grad_(True)
            ops.gather_rows(hc, pos.cpu()).backward(g.cpu())
            assert torch.equal(out.cpu(), ops.gather_rows(hidden.cpu(), pos.cpu()))
            torch.testing.assert_close(h.grad.cpu(), hc.grad, atol=ATOL[dtype], rtol=0)


@pytest.mark.gpu
def test_cuda_opcheck_and_inductor(cuda_device):
    _cuda_part_or_fail()
    _check_opcheck_and_compile(cuda_device, "inductor")


@pytest.mark.gpu
def test_cuda_gather_unaligned_and_no_sync(cuda_device):
    _cuda_part_or_fail()
    base, pos = _inputs(2, 33, 9, 64, torch.bfloat16, device=cuda_device, seed=2)
    storage = torch.empty(base.numel() + 1, dtype=base.dtype, device=cuda_device)
    hidden = storage[1:].view(base.shape)  # contiguous, but 2 bytes off a 16-byte boundary: the scalar path
    hidden.copy_(base)
    _check(hidden, pos)
    _check(base[:, :, 1:], pos)  # non-contiguous: copied to a fresh (aligned) tensor first
    h, p = _inputs(8, 128, 48, 768, torch.bfloat16, device=cuda_device)
    h.requires_grad_(True)
    ops.gather_rows(h, p).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.gather_rows(h, p)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
