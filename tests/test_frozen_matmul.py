"""fp32 products with a frozen CPU weight go through oneDNN only where its self-check shows fp32 maths."""
import logging

import pytest
import torch
import torch.nn.functional as F

from fine_tuning_llms.engine.kernels import frozen_matmul
from fine_tuning_llms.engine.kernels.frozen_matmul import frozen_input_grad, frozen_linear, onednn_fp32_ready

pytestmark = pytest.mark.skipif(frozen_matmul.private_op("mkldnn", "_linear_pointwise") is None
                                or not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN linear")


@pytest.fixture
def fresh_verdict(monkeypatch):
    """The self-check runs again in this test, and the verdict is forgotten after it."""
    monkeypatch.setattr(frozen_matmul, "_onednn_fp32", None)


def counting_op(monkeypatch, fake=None) -> list:
    """Route ``private_op("mkldnn", "_linear_pointwise")`` through a counter (and ``fake``, if given)."""
    calls, real = [], frozen_matmul.private_op("mkldnn", "_linear_pointwise")

    def op(*args):
        calls.append(1)
        return (fake or real)(*args)

    monkeypatch.setattr(frozen_matmul, "private_op", lambda namespace, name: op)
    return calls


def reference(a, b):
    return (a.double() @ b.double()).float()


def test_fp32_products_go_through_onednn_and_equal_fp64_to_fp32_rounding(monkeypatch, fresh_verdict):
    calls = counting_op(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(37, 80)[:, :64]          # a non-contiguous input, as a reshape can give
    weight = torch.randn(48, 64)
    grad = torch.randn(37, 48)
    assert onednn_fp32_ready()
    checked = len(calls)
    torch.testing.assert_close(frozen_linear(x, weight), reference(x, weight.t()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen_input_grad(grad, weight), reference(grad, weight), rtol=1e-5, atol=1e-5)
    out = torch.empty(40, 64)
    written = frozen_input_grad(grad, weight, out=out[:37])
    assert written.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out[:37], reference(grad, weight), rtol=1e-5, atol=1e-5)
    logits = torch.empty(40, 48)
    written = frozen_linear(x, weight, out=logits[:37])
    assert written.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(logits[:37], reference(x, weight.t()), rtol=1e-5, atol=1e-5)
    assert len(calls) == checked + 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_keep_torchs_own_matmul(monkeypatch, dtype):
    calls = counting_op(monkeypatch)
    x, weight, grad = torch.randn(5, 8, dtype=dtype), torch.randn(6, 8, dtype=dtype), torch.randn(5, 6, dtype=dtype)
    assert torch.equal(frozen_linear(x, weight), F.linear(x, weight))
    assert torch.equal(frozen_input_grad(grad, weight), grad @ weight)
    out = torch.empty(5, 8, dtype=dtype)
    assert frozen_input_grad(grad, weight, out=out) is out and torch.equal(out, grad @ weight)
    logits = torch.empty(5, 6, dtype=dtype)  # written in place, bit for bit F.linear's result
    assert frozen_linear(x, weight, out=logits) is logits and torch.equal(logits, F.linear(x, weight))
    assert calls == []


def test_a_onednn_that_computes_fp32_in_bf16_fails_the_self_check(monkeypatch, fresh_verdict, caplog):
    def bf16_linear(a, weight, *rest):  # what a reduced-precision fp32 mode would do
        return (a.bfloat16().float() @ weight.bfloat16().float().t())

    calls = counting_op(monkeypatch, bf16_linear)
    with caplog.at_level(logging.INFO, logger=frozen_matmul.__name__):
        assert not onednn_fp32_ready()
    assert calls and "fp32 products stay on torch's matmul" in caplog.text
    calls.clear()
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    assert torch.equal(frozen_linear(x, weight), F.linear(x, weight))
    assert torch.equal(frozen_input_grad(x @ weight.t(), weight), (x @ weight.t()) @ weight)
    assert calls == []


def test_a_onednn_that_raises_fails_the_self_check(monkeypatch, fresh_verdict):
    def broken(*args):
        raise RuntimeError("unsupported")

    counting_op(monkeypatch, broken)
    assert not onednn_fp32_ready()
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    assert torch.equal(frozen_linear(x, weight), F.linear(x, weight))
