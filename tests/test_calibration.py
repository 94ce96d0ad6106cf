"""Calibration statistics: which products by a model weight are seen, and what the user is told
about the layers that are not (pbtvm/calibration.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbtvm
from pbtvm.calibration import input_importance
from pbtvm.errors import InputError, InputTypeError
from pbtvm.lowering import torch_weight_key


def _mean_square(x: torch.Tensor) -> np.ndarray:
    rows = x.detach().double().reshape(-1, x.shape[-1])
    return (rows**2).mean(0).numpy()


class _Functional(nn.Module):
    """``F.linear`` with the module's own parameter, ``x @ W.T`` by another module's weight, and
    an ``nn.Linear`` called with its input by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 16) * 0.1)
        self.inner = nn.Linear(12, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x, self.w))
        h = torch.tanh(h @ self.inner.weight.T + self.inner.bias)
        return self.head(input=h)


def test_products_by_model_weights_are_seen_however_called():
    torch.manual_seed(0)
    model = _Functional().eval()
    batches = [torch.randn(2, 3, 16) * torch.linspace(0, 2, 16) for _ in range(2)]
    imp = input_importance(model, batches)
    x = torch.cat([b.reshape(-1, 16) for b in batches])
    with torch.no_grad():
        h1 = torch.relu(F.linear(x, model.w))
        h2 = torch.tanh(h1 @ model.inner.weight.T + model.inner.bias)
    for weight, inputs in ((model.w, x), (model.inner.weight, h1), (model.head.weight, h2)):
        np.testing.assert_allclose(imp[torch_weight_key(weight)], _mean_square(inputs), rtol=1e-6)
    assert len(imp) == 3


def test_attention_projections_are_seen():
    """``nn.MultiheadAttention``'s fused inference path runs its projections inside one op; the
    calibration runs it unfused (and puts torch's setting back)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 5, 16)
    imp = input_importance(Attention().eval(), [x])
    np.testing.assert_allclose(imp[torch_weight_key(mha.in_proj_weight)], _mean_square(x), rtol=1e-6)
    assert torch_weight_key(mha.out_proj.weight) in imp
    assert torch.backends.mha.get_fastpath_enabled()


class _Frozen(nn.Module):
    """Cross-attention, a transposed activation times a parameter, einsum and ``x @ v``: with
    frozen weights torch's matmul reaches bmm (weight broadcast) and mv, not mm (a review)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.w = nn.Parameter(torch.randn(16, 8))
        self.e = nn.Parameter(torch.randn(8, 8))
        self.v = nn.Parameter(torch.randn(8))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        h = self.mha(q, kv, kv, need_weights=False)[0]
        g = h.transpose(0, 1).contiguous().transpose(0, 1) @ self.w  # strided 3-D input
        g = torch.einsum("bsk,nk->bsn", g, self.e)
        return g @ self.v


@pytest.mark.parametrize("inference", [False, True])
def test_frozen_models_and_inference_mode_are_seen(inference):
    torch.manual_seed(0)
    model = _Frozen().eval().requires_grad_(False)
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    with torch.inference_mode(inference):
        imp = input_importance(model, [(q, kv)])
    with torch.no_grad():
        h = model.mha(q, kv, kv, need_weights=False)[0]
        g = h @ model.w
        g2 = torch.einsum("bsk,nk->bsn", g, model.e)
    np.testing.assert_allclose(imp[torch_weight_key(model.w.t())], _mean_square(h), rtol=1e-6)
    np.testing.assert_allclose(imp[torch_weight_key(model.e)], _mean_square(g), rtol=1e-6)
    np.testing.assert_allclose(imp[torch_weight_key(model.v[None])], _mean_square(g2), rtol=1e-6)
    np.testing.assert_allclose(imp[torch_weight_key(model.mha.in_proj_weight[:16])], _mean_square(q), rtol=1e-6)
    np.testing.assert_allclose(imp[torch_weight_key(model.mha.in_proj_weight[16:])], _mean_square(kv), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every PB layer calibrated: no "saw no input" warning
        warnings.filterwarnings("ignore", message=".*stay in full precision")  # attention's q k^T
        pbtvm.compile(model, (q, kv), "llvm", bits=2, calibration=[(q, kv)])


def test_batches_that_are_not_tensors_are_named():
    model = nn.Linear(8, 4).eval()
    with pytest.raises(InputTypeError, match="calibration batch 1 holds a ndarray"):
        input_importance(model, [torch.randn(2, 8), np.ones((2, 8), np.float32)])
    with pytest.raises(InputTypeError, match="got dict"):
        input_importance(model, {"x": torch.randn(2, 8)})


def test_lstm_layers_are_seen():
    """Each layer's W_ih multiplies its input, W_hh the hidden state before each step (both
    directions, state given): the statistics equal those of torch's own layers run one by one
    (calibration runs nn.LSTM without oneDNN, whose LSTM is one op)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, num_layers=2, batch_first=True, bidirectional=True).eval()
    x, h0, c0 = torch.randn(3, 4, 6), torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    imp = input_importance(lstm, [(x, (h0, c0))])
    assert torch.backends.mkldnn.enabled  # put back
    inputs = x
    with torch.no_grad():
        for layer in range(2):
            one = nn.LSTM(inputs.shape[-1], 5, batch_first=True, bidirectional=True)
            for suffix in ("", "_reverse"):
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(one, f"{kind}_l0{suffix}").copy_(getattr(lstm, f"{kind}_l{layer}{suffix}"))
            out, _ = one(inputs, (h0[2 * layer : 2 * layer + 2], c0[2 * layer : 2 * layer + 2]))
            fwd = torch.cat([h0[2 * layer][:, None], out[:, :-1, :5]], dim=1)  # h before each step
            rev = torch.cat([out[:, 1:, 5:], h0[2 * layer + 1][:, None]], dim=1)
            for suffix, before in (("", fwd), ("_reverse", rev)):
                got_ih = imp[torch_weight_key(getattr(lstm, f"weight_ih_l{layer}{suffix}"))]
                got_hh = imp[torch_weight_key(getattr(lstm, f"weight_hh_l{layer}{suffix}"))]
                np.testing.assert_allclose(got_ih, _mean_square(inputs), rtol=1e-5)
                np.testing.assert_allclose(got_hh, _mean_square(before), rtol=1e-4)
            inputs = out


def test_an_lstm_with_a_forward_of_its_own_is_seen_as_it_runs():
    """A subclass's forward scales the input before nn.LSTM's: W_ih multiplies the scaled rows (a
    pre-hook on the module saw the unscaled ones)."""
    torch.manual_seed(0)
    scale = torch.linspace(0, 3, 6)

    class Shift(nn.LSTM):
        def forward(self, input, hx=None):
            return super().forward(input * scale, hx)

    lstm = Shift(6, 5, batch_first=True).eval()
    x = torch.randn(3, 4, 6)
    imp = input_importance(lstm, [x])
    np.testing.assert_allclose(imp[torch_weight_key(lstm.weight_ih_l0)], _mean_square(x * scale), rtol=1e-5)
    assert torch_weight_key(lstm.weight_hh_l0) in imp


def test_layers_calibration_cannot_see_are_named_in_a_warning():
    """A weight computed by ops (W * mask) is a PB layer no product by a model weight reaches."""
    torch.manual_seed(0)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 16))
            self.register_buffer("mask", (torch.rand(8, 16) > 0.5).float())
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x @ (self.w * self.mask).T)[0])

    model = Masked().eval()
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match=r"calibration saw no input of 1 layer\(s\), quantized data-free: ") as record:
        pbtvm.compile(model, (x,), "llvm", bits=2, calibration=[x])
    (message,) = [str(w.message) for w in record if "calibration saw" in str(w.message)]
    assert "dense[8, 16]" in message and "lstm" not in message and "head" not in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer seen: no warning
        pbtvm.compile(model.head, (torch.randn(3, 16),), "llvm", bits=2, calibration=[torch.randn(3, 16)])


def test_calibration_with_the_max_quantizer_is_refused():
    model = nn.Linear(8, 4).eval()
    with pytest.raises(InputError, match="quantizer='max' takes each row's full range"):
        pbtvm.compile(model, (torch.randn(2, 8),), "llvm", bits=2, quantizer="max", calibration=[torch.randn(2, 8)])


def test_the_top_module_is_named_in_messages():
    model = nn.Linear(8, 4).eval()
    bad = torch.randn(2, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"the inputs of <model> \(Linear\) hold NaN"):
        pbtvm.compile(model, (torch.randn(2, 8),), "llvm", bits=2, calibration=[bad])
