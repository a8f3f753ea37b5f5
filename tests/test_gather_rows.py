"""agxguard._C.gather_rows: the Batcher's collate by memcpy. It must give exactly what
torch.cat (or the padded copy_ + fill_) gives, and refuse (False, nothing written) every
tensor it does not handle, so that the Batcher falls back to torch."""
import pytest

torch = pytest.importorskip("torch", reason="gather_rows copies torch tensors")

from agxguard import _C  # noqa: E402


def padded_reference(xs, pad_dim, width, value):
    parts = []
    for x in xs:
        shape = list(x.shape)
        shape[pad_dim] = width
        p = torch.full(shape, value, dtype=x.dtype)
        p.narrow(pad_dim, 0, x.shape[pad_dim]).copy_(x)
        parts.append(p)
    return torch.cat(parts, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64, torch.int8, torch.bool])
def test_fixed_length_equals_torch_cat(dtype):
    g = torch.Generator().manual_seed(1)
    xs = [(torch.randn(r, 3, 5, generator=g) * 10).to(dtype) for r in (1, 2, 1, 4, 0, 3)]
    dst = torch.full((11, 3, 5), 7).to(dtype)
    assert _C.gather_rows(dst, xs) is True
    assert torch.equal(dst, torch.cat(xs, 0))


@pytest.mark.parametrize("pad_dim,shape", [(1, (2, 0, 4)), (1, (1, 0)), (2, (2, 3, 0, 2)),
                                           (3, (1, 2, 2, 0))])
def test_padded_equals_copy_and_fill(pad_dim, shape):
    g = torch.Generator().manual_seed(2)
    xs = []
    for n in (3, 7, 1, 7, 0):
        s = list(shape)
        s[pad_dim] = n
        xs.append(torch.randn(*s, generator=g))
    width = 9
    dshape = list(shape)
    dshape[0] = sum(x.shape[0] for x in xs)
    dshape[pad_dim] = width
    dst = torch.full(dshape, float("nan"))
    assert _C.gather_rows(dst, xs, pad_dim, torch.tensor([-2.5])) is True
    assert torch.equal(dst, padded_reference(xs, pad_dim, width, -2.5))


def test_padded_without_short_requests_needs_no_pad_value():
    xs = [torch.randn(1, 4, 2), torch.randn(2, 4, 2)]
    dst = torch.empty(3, 4, 2)
    assert _C.gather_rows(dst, xs, 1, None) is True
    assert torch.equal(dst, torch.cat(xs, 0))


def refused(dst, xs, *rest):
    before = dst.clone()
    got = _C.gather_rows(dst, xs, *rest)
    return got is False and torch.equal(dst, before)


def test_what_it_does_not_handle_is_refused_with_nothing_written():
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    dst = torch.zeros(4, 4)
    assert refused(dst, [a, b.t().contiguous().t()])  # not contiguous
    assert refused(dst, [a, b.double()])  # another dtype
    assert refused(dst, [a, b.requires_grad_()])  # autograd
    assert refused(dst, [a, torch.randn(2, 5)])  # another shape
    assert refused(dst, [a, torch.randn(3, 4)])  # rows do not add up
    assert refused(dst, [a, "not a tensor"])
    assert refused(dst, [a, torch.randn(2, 4).to_sparse()])
    assert refused(dst.t(), [a, torch.randn(2, 4)])  # dst not contiguous
    c = torch.zeros(4, 4, dtype=torch.complex64)
    assert refused(c, [torch.randn(2, 4, dtype=torch.complex64).conj()] * 2)  # complex
    # padded: longer than dst, or short without a pad value, or a pad of the wrong dtype
    d = torch.zeros(2, 3, 2)
    assert refused(d, [torch.randn(1, 4, 2), torch.randn(1, 3, 2)], 1, torch.tensor([0.0]))
    assert refused(d, [torch.randn(1, 2, 2), torch.randn(1, 3, 2)], 1, None)
    assert refused(d, [torch.randn(1, 2, 2), torch.randn(1, 3, 2)], 1, torch.tensor([0], dtype=torch.int64))


def test_bad_calls_raise():
    with pytest.raises(TypeError):
        _C.gather_rows(torch.zeros(1))
    with pytest.raises(TypeError):
        _C.gather_rows(torch.zeros(1), (torch.zeros(1),))


def test_the_batcher_collates_with_it_and_falls_back_to_torch_for_the_rest(monkeypatch):
    """Fixed and padded batches go through gather_rows; requests it refuses (not contiguous,
    needing grad) still get the same answers through torch.cat / copy_."""
    import agxguard.batcher as B
    from agxguard import Batcher

    calls = []

    def counting(*args):
        calls.append(got := _C.gather_rows(*args))
        return got

    monkeypatch.setattr(B, "_gather_rows", counting)
    g = torch.Generator().manual_seed(5)
    plain = [torch.randn(2, 6, generator=g) for _ in range(24)]
    odd = [torch.randn(6, 2, generator=g).t() for _ in range(8)]  # not contiguous
    with Batcher(lambda x: x * 2, max_batch=8, max_delay_ms=20) as b:
        futures = [b.submit(x) for x in plain + odd]
        got = [f.result(60) for f in futures]
    for x, y in zip(plain + odd, got):
        assert torch.equal(y, x * 2)
    assert True in calls and False in calls
    calls.clear()
    var = [torch.randn(1, int(n), 3, generator=g) for n in (2, 5, 1, 5, 3, 4, 2, 1)]

    def fn(x, lengths):
        return x + lengths[:, None, None].to(x.dtype)

    with Batcher(fn, max_batch=8, max_delay_ms=50, pad_dim=1, pad_value=-1.0) as b:
        futures = [b.submit(x) for x in var]
        got = [f.result(60) for f in futures]
    for x, y in zip(var, got):
        assert torch.equal(y, x + x.shape[1])
    assert calls and all(calls)
