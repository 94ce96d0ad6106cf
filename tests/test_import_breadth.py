"""Models at the edges of what ``pbtvm.compile`` imports (from an adversarial run): forwards that
change state, products torch decomposes, models torch.export cannot trace, torch's own quantized
modules, bfloat16 calibration; stacked and autocast weights, unread complex tensors, Transformer
masks, None outputs (the thirty-second session)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pbtvm
from pbtvm.errors import InputError, InputTypeError


def _rel(got, want) -> float:
    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    return float((got - want).abs().max() / want.abs().max())


def _compile(model, example, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled = pbtvm.compile(model, example, **kwargs)
    return compiled, [str(w.message) for w in seen if str(w.message).startswith("pbtvm")]


class _Counter(nn.Module):
    """A step counter in a buffer, updated in place by forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.register_buffer("steps", torch.zeros(1))

    def forward(self, x):
        self.steps.add_(1)
        return self.lin(x) + self.steps


class _InPlaceInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


def test_a_forward_changing_state_is_named_and_compile_leaves_model_and_example_alone():
    """compile ran the model twice: the caller's buffer went 0 -> 2 and was baked in as 2 (every
    call returned steps 3), and an example the forward doubles in place came back x4; no warning."""
    torch.manual_seed(0)
    model, x = _Counter().eval(), torch.randn(3, 16)
    compiled, said = _compile(model, (x,), bits=16, act_bits=16)
    assert [m for m in said if "forward changes buffer steps. The compiled" in m], said
    assert model.steps.item() == 0
    with torch.no_grad():
        first_call = model.lin(x) + 1  # what torch's first call returns
    for _ in range(3):  # no state: every call is the first one
        assert _rel(compiled(x), first_call) < 1e-3
    doubling, ones = _InPlaceInput().eval(), torch.ones(3, 16)
    compiled, said = _compile(doubling, (ones,), bits=16, act_bits=16)
    assert torch.equal(ones, torch.ones(3, 16))
    assert [m for m in said if "forward changes input 0. The compiled" in m], said
    with torch.no_grad():
        want = doubling.lin(torch.full((3, 16), 2.0))
    got_input = torch.ones(3, 16)
    assert _rel(compiled(got_input), want) < 1e-3 and torch.equal(got_input, torch.ones(3, 16))
    _, said = _compile(nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)).train(), (x,))
    assert not [m for m in said if "forward changes" in m], said  # compiled in eval mode: running stats stay


def test_a_model_made_in_inference_mode_keeps_its_buffers():
    with torch.inference_mode():
        made_there = nn.Linear(16, 8).eval()
    with pytest.raises(InputError, match="made in torch.inference_mode"):  # was torch's RuntimeError
        pbtvm.compile(made_there, (torch.randn(3, 16),))
    fresh = _Counter().eval()
    with torch.inference_mode(), pytest.warns(UserWarning, match="changes buffer steps"):
        pbtvm.compile(fresh, (torch.randn(3, 16),))
    assert fresh.steps.item() == 0


def test_models_torch_export_cannot_trace_are_input_errors_without_torch_graph_dumps(capfd):
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(32, 8)

        def forward(self, x):
            y = self.lin(x)
            return y * 2 if y.sum() > 0 else y

    with pytest.raises(InputError, match=r"torch.export cannot trace the model: .*choose with torch.where"):
        pbtvm.compile(Branching().eval(), (torch.randn(4, 32),))
    err = capfd.readouterr().err
    assert "def forward" not in err and "batch dimension" not in err, err[-2000:]  # torch's partial graph, twice
    assert "Unable to find user code" not in err, err[-2000:]  # torch's log of the failed trace

    class Flattening(nn.Module):  # the dynamic batch fails in a meta function; the fixed one works
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(32, 8)

        def forward(self, x):
            return self.lin(x.view(1, -1))

    with pytest.warns(UserWarning, match="could not be made dynamic"):
        pbtvm.compile(Flattening().eval(), (torch.randn(1, 32),))
    err = capfd.readouterr().err
    assert "fake_tensor" not in err and "Traceback" not in err, err[-2000:]  # torch logged the meta failure


def test_torch_quantized_modules_are_refused_by_name():
    float_model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of torch.ao.quantization
        quantized = torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(InputTypeError, match=r"0 \(torch.ao.nn.quantized.dynamic.Linear\), 2 \(.*pass the float model"):
        pbtvm.compile(quantized, (torch.randn(2, 16),))


class _Products(nn.Module):
    """Weight products torch decomposes (mv: multiply + sum) or writes with the weight on the left."""

    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Parameter(torch.randn(16, 32) * 0.2)
        self.score = nn.Parameter(torch.randn(32))

    def forward(self, x):
        return torch.mv(self.mixer, x[0]), x @ self.score, (self.mixer @ x.T).T, torch.mv(x, x[0])


def test_matrix_vector_and_left_constant_products_are_pb_layers():
    torch.manual_seed(0)
    model, x = _Products().eval(), torch.randn(3, 32)
    compiled, said = _compile(model, (x,), bits=8)
    assert sorted(compiled.converted_layers) == ["mixer (_Products)", "mixer (_Products)", "score (_Products)"]
    # the product of two run-time tensors stays, named as such
    assert compiled.fp32_layers == ["<model> (_Products): relax.matmul"]
    assert [m for m in said if "1 product(s) of two run-time tensors" in m and "e.g. [s77, 32] @ [32, 1]" in m], said
    for batch in (3, 5):
        x = torch.randn(batch, 32)
        with torch.no_grad():
            want = model(x)
        got = compiled(x)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
        assert max(_rel(g, w) for g, w in zip(got[:3], want[:3], strict=True)) < 0.02  # W8
        assert _rel(got[3], want[3]) < 1e-5  # full precision


def test_bfloat16_models_calibrate():
    """The calibration keyed bfloat16 weights through numpy, which has no bfloat16 (a TypeError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(torch.bfloat16).eval()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    scales = torch.logspace(-2, 1, 64, dtype=torch.bfloat16)  # unequal input columns: calibration matters
    batches = [torch.randn(16, 64, dtype=torch.bfloat16) * scales for _ in range(3)]
    plain, _ = _compile(model, (x * scales,), bits=2)
    calibrated, _ = _compile(model, (x * scales,), bits=2, calibration=batches)
    assert calibrated.manifest["quantizer"]["calibrated"]
    assert not np.array_equal(plain(x * scales).float().numpy(), calibrated(x * scales).float().numpy())


def test_named_tuples_of_classes_not_imported_come_back_as_named_tuples():
    """A loaded library's named tuple class may live in a module the loading process lacks (the
    compiling script's ``__main__``): a named tuple of that name and fields stands in."""
    from pbtvm import outputs

    structure = {"namedtuple": {"class": "not_imported_here:Out", "fields": ["logits", "h"], "items": ["tensor"] * 2}}
    out = outputs.rebuild(structure, [1, 2])
    assert out.logits == 1 and out.h == 2 and type(out).__name__ == "Out" and out == (1, 2)
    odd = {"namedtuple": {"class": "gone:<locals>.X", "fields": ["a", "class"], "items": ["tensor"] * 2}}
    assert tuple(outputs.rebuild(odd, [1, 2])) == (1, 2)  # names namedtuple refuses are renamed


class _ScaledInPlace(nn.Module):
    """A parameter changed in place by forward (copied before the write, put back after)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        with torch.no_grad():
            self.scale.mul_(2)
        return self.lin(x) * self.scale


def test_parameters_changed_in_place_are_put_back_and_float_helpers_compile():
    """The review of the first fix: a parameter doubled in place stayed doubled (and was baked in);
    a lazy module's uninitialized buffer and FloatFunctional (a float module under torch.ao.nn.quantized)
    made compile fail; an example made in inference mode could not be traced."""
    torch.manual_seed(1)
    model, x = _ScaledInPlace().eval(), torch.randn(3, 16)
    compiled, said = _compile(model, (x,), bits=16, act_bits=16)
    assert model.scale.item() == 1.0 and [m for m in said if "changes parameter scale" in m], said
    with torch.no_grad():
        assert _rel(compiled(x), model.lin(x) * 2) < 1e-3  # torch's first call

    class Helpers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.norm = nn.Linear(16, 8), nn.LazyBatchNorm1d()
            self.skip = torch.ao.nn.quantized.FloatFunctional()

        def forward(self, x):
            y = self.lin(x)
            return self.skip.add(self.norm(y), y)

    helpers = Helpers().eval()
    with torch.inference_mode():
        example = torch.randn(3, 16)
    compiled, _ = _compile(helpers, (example,), bits=16, act_bits=16)
    with torch.no_grad():
        assert _rel(compiled(x), helpers(x)) < 1e-3


def test_a_product_of_constants_alone_stays_in_full_precision():
    class Constants(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.v, self.lin = (
                nn.Parameter(torch.randn(16, 32)),
                nn.Parameter(torch.randn(32)),
                nn.Linear(32, 16),
            )

        def forward(self, x):
            return self.lin(x) + torch.mv(self.w * 2, self.v)

    model, x = Constants().eval(), torch.randn(3, 32)
    compiled, _ = _compile(model, (x,), bits=16, act_bits=16)
    assert compiled.converted_layers == ["lin (Linear)"]
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 1e-4


class _Stacked(nn.Module):
    """Per-layer weights in one [L, N, K] parameter, each layer ``F.linear(x, self.w[i])``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 16, 16) / 4)

    def forward(self, x):
        x = torch.relu(nn.functional.linear(x, self.w[0]))
        x = torch.relu(x @ self.w[1].T)
        return x @ (self.w[2] * 0.5).T


class _Autocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.l2(torch.relu(self.l1(x)))


def test_entries_of_a_stacked_weight_are_pb_layers_named_by_index():
    """``W[i]`` (torch's ``select``, a constant ``take``) was left in full precision."""
    torch.manual_seed(0)
    model, x = _Stacked().eval(), torch.randn(4, 16)
    compiled, said = _compile(model, (x,), bits=8)
    # w[2] * 0.5 is named after w[2] too
    assert compiled.converted_layers == ["w[0] (_Stacked)", "w[1] (_Stacked)", "w[2] (_Stacked)"], said
    assert compiled.fp32_layers == [] and not said
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 0.02  # W8
        model.w[1, 3] = 3e38 * torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)  # the quantizer's errors too
    with pytest.raises(InputError, match=r"layer w\[1\] \(_Stacked\): weight row 3 spans"):
        pbtvm.compile(model, (x,), bits=1, codebook="offset_binary")


def test_layers_under_autocast_are_pb_layers_of_the_cast_weights():
    """Under ``torch.autocast`` each weight is cast (``astype``) before its product: the layers were
    left in full precision, named after the model. The PB layer quantizes the bfloat16-rounded
    weight, as torch multiplies by it, and is named as the module; calibration applies."""
    torch.manual_seed(0)
    model, x = _Autocast().eval(), torch.randn(5, 32)
    compiled, said = _compile(model, (x,), bits=16, act_bits=16)
    assert compiled.converted_layers == ["l1 (Linear)", "l2 (Linear)"] and not said, said
    with torch.no_grad():
        want = model(x)
    got = compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert _rel(got, want) < 0.02  # bfloat16's own rounding
    scales = torch.logspace(-2, 1, 32)  # unequal input columns: calibration matters
    plain, _ = _compile(model, (x,), bits=2)
    calibrated, said = _compile(model, (x,), bits=2, calibration=[torch.randn(16, 32) * scales])
    assert calibrated.converted_layers == ["l1 (Linear)", "l2 (Linear)"] and not said, said
    assert not torch.equal(plain(x * scales), calibrated(x * scales))


class _UnusedComplex(nn.Module):
    """A complex buffer and parameter that forward never reads (a rotary table kept beside a real one)."""

    def __init__(self, reads: bool = False) -> None:
        super().__init__()
        self.lin, self.reads = nn.Linear(16, 8), reads
        self.register_buffer("freqs_cis", torch.polar(torch.ones(8, 4), torch.randn(8, 4)))
        self.register_buffer("rope", torch.polar(torch.ones(6, 4), torch.randn(6, 4)), persistent=False)
        self.phase = nn.Parameter(torch.randn(3, dtype=torch.complex64))

    def forward(self, x):
        y = self.lin(x)[:, : self.rope.shape[0]]  # its size only: a constant of the trace
        return y + self.freqs_cis.real.sum() if self.reads else y


def test_complex_tensors_forward_never_reads_do_not_stop_compile():
    """TVM's importer converts every lifted tensor, read or not: an unread complex buffer was refused
    as if the model used it."""
    torch.manual_seed(0)
    model, x = _UnusedComplex().eval(), torch.randn(4, 16)
    compiled, _ = _compile(model, (x,), bits=8)
    assert compiled.converted_layers == ["lin (Linear)"]
    assert model.freqs_cis.is_complex() and isinstance(model.phase, nn.Parameter) and model.phase.is_complex()
    assert model.rope.is_complex() and "rope" not in model.state_dict()
    with torch.no_grad():
        want = model(x)
    assert compiled(x).shape == want.shape == (4, 6)  # the stand-ins keep the tensors' sizes
    assert _rel(compiled(x), want) < 0.02
    with pytest.raises(InputError, match="no complex tensors: freqs_cis; keep the model real"):
        pbtvm.compile(_UnusedComplex(reads=True).eval(), (x,), bits=8)
    branches = _UnusedComplex().eval()  # a forward that differs for a real stand-in is refused the same way
    branches.forward = lambda x: branches.lin(x) * (2 if branches.phase.is_complex() else 3)
    with pytest.raises(InputError, match="no complex tensors: phase, freqs_cis, rope"):
        pbtvm.compile(branches, (x,), bits=8)


class _CausalEncoder(nn.Module):
    def __init__(self, is_causal: bool | None) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.enc, self.is_causal = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), is_causal

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.enc(x, mask=mask, is_causal=self.is_causal)


def test_a_transformer_mask_without_is_causal_gets_advice_that_fits():
    """torch's nn.Transformer* layers compare a mask's values with a causal one when is_causal is not
    given, which torch.export cannot trace: the advice was to rewrite a Python branch the model does
    not have."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    with pytest.raises(InputError, match=r"pass is_causal=True \(a decoder: tgt_is_causal=True\) with a causal mask"):
        pbtvm.compile(_CausalEncoder(None).eval(), (x,), bits=8)
    model = _CausalEncoder(True).eval()
    compiled, _ = _compile(model, (x,), bits=8)
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 0.05  # W8


class _WithNones(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        out, weights = self.mha(x, x, x, need_weights=False)  # weights: None
        return out, weights, {"none": None, "double": x * 2}


def test_nones_in_the_output_come_back_as_none(tmp_path):
    """``nn.MultiheadAttention(need_weights=False)`` returns ``(out, None)``: a model returning it was
    refused ("the model returns a NoneType")."""
    torch.manual_seed(0)
    model, x = _WithNones().eval(), torch.randn(2, 5, 16)
    compiled, _ = _compile(model, (x,), bits=8)
    loaded = pbtvm.load(compiled.export(str(tmp_path / "nones.so")))
    with torch.no_grad():
        want = model(x)
    for got in (compiled(x), loaded(x)):
        assert got[1] is None and got[2]["none"] is None and list(got[2]) == ["none", "double"]
        assert _rel(got[0], want[0]) < 0.05 and torch.equal(got[2]["double"], want[2]["double"])
    assert compiled(x.numpy())[1] is None
    with pytest.raises(InputTypeError, match=r"the model returns no tensor \(tuple\)"):
        pbtvm.compile(_Returns(lambda _: (None, {"a": None})).eval(), (x,))


class _Returns(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _BufferAndHeads(nn.Module):
    """A frozen weight registered as a buffer, and per-head projections of one 4-D parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("frozen", torch.randn(24, 32) / 6)
        self.qkv = nn.Parameter(torch.randn(3, 4, 8, 32) / 6)

    def forward(self, x):
        q, k, v = torch.einsum("btd,khed->kbhte", x, self.qkv)
        return nn.functional.linear(x, self.frozen), q + k + v


def test_buffer_weights_and_reshaped_weights_are_named():
    """Both were listed as ``dense[N, K]``."""
    torch.manual_seed(0)
    model, x = _BufferAndHeads().eval(), torch.randn(2, 5, 32)
    compiled, _ = _compile(model, (x,), bits=8)
    assert sorted(compiled.converted_layers) == ["frozen (_BufferAndHeads)", "qkv (_BufferAndHeads)"]
    with torch.no_grad():
        assert max(_rel(g, w) for g, w in zip(compiled(x), model(x), strict=True)) < 0.02


class _AutocastStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for layer in self.layers:
                x = layer(x) * 10  # each layer's inputs 10x the last's
            return x


def test_calibration_under_autocast_keeps_layers_apart_over_batches():
    """A cast copy's address is freed when its batch ends and taken by another weight's cast in the
    next: its cached key filed one layer's inputs under another (a review's repro)."""
    from pbtvm.calibration import input_importance
    from pbtvm.lowering import torch_weight_key

    torch.manual_seed(0)
    model = _AutocastStack().eval()
    batches = [torch.randn(8, 64) for _ in range(6)]
    got = input_importance(model, batches)
    want: dict[str, list] = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x in batches:
            for layer in model.layers:
                want.setdefault(torch_weight_key(layer.weight.to(torch.bfloat16)), []).append(x.bfloat16().double())
                x = layer(x) * 10
    assert sorted(got) == sorted(want)
    for key, rows in want.items():
        np.testing.assert_allclose(got[key], (torch.cat(rows) ** 2).mean(0).numpy(), rtol=1e-6)


def test_export_advice_reads_the_errors_a_failure_was_raised_from():
    """torch.export re-raises some failures wrapped (``raise ... from``): the advice looked at the
    outer error's traceback and text only, and fell back to the generic pointer."""
    from pbtvm.torch_export import _export_advice

    def _detect_is_causal_mask():  # the frame name torch's Transformer layers fail in
        raise RuntimeError("cannot trace")

    def failed(inner):
        try:
            try:
                inner()
            except RuntimeError as cause:
                raise ValueError("export failed") from cause
        except ValueError as err:
            return err

    assert "pass is_causal=True" in _export_advice(failed(_detect_is_causal_mask))

    def data_dependent():
        raise RuntimeError("Could not guard on data-dependent expression u0 > 0")

    assert "torch.where" in _export_advice(failed(data_dependent))
    try:  # an error handled inside a suppressed context is not read
        try:
            data_dependent()
        except RuntimeError:
            raise ValueError("other") from None
    except ValueError as err:
        assert "torch.export's documentation" in _export_advice(err)


class _ScaledWeights(nn.Module):
    """Weights scaled or negated in forward: ``x @ (-W).T``, then ``@ (V * 0.5).T``."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(8, 16))
        self.V = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return (x @ (-self.W).T) @ (self.V * 0.5).T


def test_weight_norm_layers_are_pb_layers_named_as_their_modules():
    """``weight_norm`` (parametrization or hook) computes the weight as ``g * v / ||v||``: torch's
    decomposition's abs, power and sum were not folded, so the layer stayed in full precision
    ("weight is not a constant (made from constants by ops ...)"). Scaled weights are named too
    (were ``dense[8, 8]``)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        model = nn.Sequential(
            nn.utils.parametrizations.weight_norm(nn.Linear(16, 8)),
            nn.ReLU(),
            nn.utils.weight_norm(nn.Linear(8, 4)),
        ).eval()
    x = torch.randn(3, 16)
    for module, names in ((model, ["0 (ParametrizedLinear)", "2.weight_v (Linear)"]), (_ScaledWeights(), ["W", "V"])):
        compiled, warned = _compile(module, (x,), bits=8)
        assert len(compiled.converted_layers) == 2 and not compiled.fp32_layers and not warned, warned
        got = [layer["name"] for layer in compiled.manifest["layers"]["converted"]]
        assert [name.split(" (")[0] for name in got] == [name.split(" (")[0] for name in names], got
        with torch.no_grad():
            assert _rel(compiled(x), module(x)) < 0.02  # W8A8
