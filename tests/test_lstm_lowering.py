"""``pbtvm.compile`` of whole models with ``nn.LSTM`` inside: any length and batch, one module, exported .so.

The models are written here the way a user writes them (not built from pbtvm's helpers); each is
compiled once at one example length and run at other lengths and batches.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm.decoder import compile_decoder
from pbtvm.lstm import compile_lstm
from pbtvm.worker_env import env_without_torch

LENGTHS = (1, 5, 17, 64)
BATCHES = (1, 3)
PRECISIONS = [(16, 16, 1e-3), (8, 8, 5e-2)]  # (bits, act_bits, relative error bound vs torch)


class WordLM(torch.nn.Module):
    """Embedding -> 2-layer LSTM (time-major, bias) -> Linear; takes and returns the state."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(40, 16)
        self.rnn = torch.nn.LSTM(16, 24, num_layers=2)
        self.head = torch.nn.Linear(24, 40)

    def forward(self, tokens, h0, c0):
        y, (h, c) = self.rnn(self.embedding(tokens), (h0, c0))
        return self.head(y), (h, c)

    def example(self, steps: int, batch: int) -> tuple:
        state = torch.randn(2, batch, 24) * 0.5
        return torch.randint(0, 40, (steps, batch)), state, torch.randn(2, batch, 24) * 0.5


class BiClassifier(torch.nn.Module):
    """Bidirectional batch-first LSTM without bias, no initial state; classifies from (h_n, c_n)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(12, 20, batch_first=True, bidirectional=True, bias=False)
        self.out = torch.nn.Linear(40, 5)

    def forward(self, x):
        _, (h, _) = self.rnn(x)
        return self.out(torch.cat([h[-2], h[-1]], dim=1))

    def example(self, steps: int, batch: int) -> tuple:
        return (torch.randn(batch, steps, 12),)


class PooledTagger(torch.nn.Module):
    """Batch-first 1-layer LSTM, mean over time, Linear: returns the logits only."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(10, 32, batch_first=True)
        self.proj = torch.nn.Linear(32, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.proj(torch.relu(y).mean(dim=1))

    def example(self, steps: int, batch: int) -> tuple:
        return (torch.randn(batch, steps, 10),)


MODELS = {"word_lm": WordLM, "bidirectional": BiClassifier, "pooled": PooledTagger}


def _flat(out) -> list:
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat(o)]
    return [out]


def _rel(got, want) -> float:
    return float((got - want).norm() / want.norm())


_COMPILED: dict = {}


def _compiled(name: str, bits: int, act_bits: int) -> tuple:
    """(torch model, its compile at example length 9, batch 2), built once per test session."""
    key = (name, bits, act_bits)
    if key not in _COMPILED:
        torch.manual_seed(7)
        model = MODELS[name]().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no unroll warning, no torch export noise
            _COMPILED[key] = model, pbtvm.compile(model, model.example(9, 2), bits=bits, act_bits=act_bits)
    return _COMPILED[key]


@pytest.mark.parametrize(("bits", "act_bits", "bound"), PRECISIONS, ids=["W16A16", "W8A8"])
@pytest.mark.parametrize("name", list(MODELS))
def test_any_length_and_batch_matches_torch(name, bits, act_bits, bound):
    model, compiled = _compiled(name, bits, act_bits)
    torch.manual_seed(1)
    for steps in LENGTHS:
        for batch in BATCHES:
            inputs = model.example(steps, batch)
            with torch.no_grad():
                want = _flat(model(*inputs))
            got = _flat(compiled(*inputs))
            assert [g.shape for g in got] == [w.shape for w in want]
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                err = _rel(g, w)
                assert err <= bound, f"output {i}, T={steps} B={batch}: {err:.2e} > {bound}"


def test_one_module_with_every_lstm_weight_in_pb():
    _, compiled = _compiled("word_lm", 8, 8)
    lstm = [f"rnn.weight_{w}_l{layer} (LSTM)" for layer in (0, 1) for w in ("ih", "hh")]
    assert compiled.converted_layers == [*lstm, "head (Linear)"]  # in the model's order
    assert not compiled.fp32_layers
    shapes = [spec["shape"] for spec in compiled.manifest["inputs"]]
    assert shapes == [[None, None], [2, None, 24], [2, None, 24]]  # length and batch at run time


def test_bitlayers_reaches_the_recurrent_kernels():
    tagger, compiled = _compiled("pooled", 8, 8)
    (x,) = tagger.example(30, 2)
    with torch.no_grad():
        want = tagger(x)
    errs = [_rel(compiled(x, bitlayers=n), want) for n in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]
    # Only the recurrent weights in PB: the knob still changes the result.
    lowered = pbtvm.compile(torch.nn.Sequential(torch.nn.LSTM(10, 32)), (torch.randn(4, 2, 10),), bits=8)
    x = torch.randn(12, 2, 10)
    y2, y8 = lowered(x, bitlayers=2)[0], lowered(x, bitlayers=8)[0]
    assert _rel(y2, y8) > 1e-3


def test_thousands_of_steps_in_one_call():
    torch.manual_seed(0)
    rnn = torch.nn.Sequential(torch.nn.LSTM(4, 8)).eval()
    compiled = pbtvm.compile(rnn, (torch.randn(3, 2, 4),), bits=16, act_bits=16)
    x = torch.randn(6000, 1, 4)  # the time loop recurses log2(T) deep, not T deep
    with torch.no_grad():
        want = _flat(rnn(x))
    for got, ref in zip(_flat(compiled(x)), want, strict=True):
        assert _rel(got, ref) <= 1e-3


def test_gru_and_rnn_are_named_in_a_warning():
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = torch.nn.GRU(6, 8)
            self.lstm = torch.nn.LSTM(8, 8)

        def forward(self, x):
            return self.lstm(self.gru(x)[0])[0]

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pbtvm.compile(Mixed(), (torch.randn(5, 2, 6),))
    messages = [str(w.message) for w in seen]
    assert any(re.match(r"pbtvm: gru \(GRU\) is recurrent and not lowered", m) for m in messages), messages
    # torch.export's warning about GRU's own _flat_weights is not for the user
    assert not [m for m in messages if "_flat_weights" in m]


def test_direct_calls_of_torch_recurrent_ops_are_named_in_a_warning():
    """``torch.lstm(...)`` in a model's own code (no nn.LSTM module) is unrolled over the example's
    length: it compiled with a fixed length and no word about it."""

    class Direct(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 8)  # its weights; its forward is not called
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            zeros = torch.zeros(1, x.shape[1], 8)
            y, _, _ = torch.lstm(x, (zeros, zeros), list(self.lstm._flat_weights), True, 1, 0.0, False, False, False)
            return self.head(y[-1])

    model, x = Direct().eval(), torch.randn(5, 2, 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled = pbtvm.compile(model, (x,), bits=16, act_bits=16)
    said = [w for w in seen if "recurrent op of torch directly" in str(w.message)]
    assert len(said) == 1 and str(said[0].message).startswith("pbtvm: <model> (Direct) calls"), said
    assert said[0].filename == __file__
    assert not [w for w in seen if "is recurrent and not lowered" in str(w.message)]  # not its nn.LSTM
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) <= 1e-3
    with pytest.raises(ValueError, match="input 0 has shape"):
        compiled(torch.randn(7, 2, 4))  # the length is the example's
    with warnings.catch_warnings(record=True) as seen:  # a GRU module is named once, by the module warning
        warnings.simplefilter("always")
        pbtvm.compile(torch.nn.GRU(4, 8), (x,))
    assert not [w for w in seen if "directly" in str(w.message)]


def test_unsupported_lstms_are_clear_errors():
    with pytest.raises(ValueError, match="proj_size"):
        pbtvm.compile(torch.nn.Sequential(torch.nn.LSTM(4, 8, proj_size=3)), (torch.randn(5, 2, 4),))
    mixed = torch.nn.LSTM(4, 8)
    mixed.weight_hh_l0.data = mixed.weight_hh_l0.data.half()
    with pytest.raises(TypeError, match=r"\['torch.float16', 'torch.float32'\] weights; recurrent layers need one of"):
        pbtvm.compile(torch.nn.Sequential(mixed), (torch.randn(5, 2, 4),))
    lm, compiled = _compiled("word_lm", 8, 8)
    tokens, h0, c0 = lm.example(5, 3)
    with pytest.raises(ValueError, match="input 1 has shape"):
        compiled(tokens, h0[:1], c0)  # wrong number of layers in the state
    # tokens [T, B] and the state's batch are both run-time sizes, but one size: an InputError
    # naming both inputs, not TVM's match_cast check
    with pytest.raises(ValueError, match=r"input 1 has size 2 in dimension 1 and input 0 has 3 in dimension 1"):
        compiled(tokens, h0[:, :2], c0[:, :2])
    with pytest.raises(ValueError, match=r"input 0 has shape \(5,\), the model expects \(n0, n1\) \(n0, n1"):
        compiled(tokens[:, 0], h0, c0)


class _Wrap(torch.nn.Module):
    """``y, h`` of one LSTM, called as ``lstm(input=x)`` (nn.LSTM.forward's own keyword)."""

    def __init__(self, lstm) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        y, (h, _) = self.lstm(input=x)
        return y, h


def test_lstms_with_a_forward_of_their_own_run_as_torch_runs_them():
    """A subclass's forward, or one set on the instance, is not nn.LSTM's: the stand-in replaced it
    (the compiled model computed a plain LSTM, silently) and compile deleted the instance's forward."""

    class Scaled(torch.nn.LSTM):
        def forward(self, input, hx=None):
            y, state = super().forward(input * 2.0, hx)
            return y * 3.0 + 1.0, state

    torch.manual_seed(0)
    patched = torch.nn.LSTM(6, 8)
    plain = patched.forward
    patched.forward = lambda input, hx=None: (plain(input, hx)[0].clamp(max=0.0), plain(input, hx)[1])
    x = torch.randn(5, 3, 6)
    for lstm, shown in ((Scaled(6, 8), "Scaled"), (patched, "LSTM")):
        model = _Wrap(lstm).eval()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compiled = pbtvm.compile(model, (x,), bits=16, act_bits=16)
        said = [w for w in seen if "not lowered" in str(w.message)]
        assert said and f"lstm ({shown}, its own forward)" in str(said[0].message), said
        assert said[0].filename == __file__  # the user's line, not pbtvm's
        with torch.no_grad():
            want = model(x)
        for got, ref in zip(compiled(x), want, strict=True):
            assert _rel(got, ref) <= 1e-4
    assert "forward" in vars(patched) and patched.forward(x)[0].max() <= 0  # the user's model is as it was
    for api in (compile_lstm, compile_decoder):  # they compile nn.LSTM's computation from the weights: said
        with pytest.warns(
            UserWarning, match=rf"{api.__name__} compiles nn.LSTM's computation from its weights"
        ) as seen:
            api(Scaled(6, 8), bits=4)
        assert seen[0].filename == __file__


def test_lstms_with_computed_weights_are_lowered_with_their_values():
    """Weights from ``parametrize`` or ``weight_norm`` (hook or parametrization) are computed, not
    parameters: compile failed inside the lowering (AttributeError on a DataflowVar)."""
    from torch.nn.utils import parametrize

    class Half(torch.nn.Module):
        def forward(self, w):
            return w * 0.5

    torch.manual_seed(0)
    by_parametrize = torch.nn.LSTM(6, 8, num_layers=2)
    parametrize.register_parametrization(by_parametrize, "weight_hh_l1", Half())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        by_hook = torch.nn.utils.weight_norm(torch.nn.LSTM(6, 8), "weight_ih_l0")
    by_parametrization = torch.nn.utils.parametrizations.weight_norm(torch.nn.LSTM(6, 8), "weight_ih_l0")
    with torch.no_grad():  # g changed after the hook last ran: the module's weight_ih_l0 is stale
        by_hook.weight_ih_l0_g.mul_(1.5)
    x = torch.randn(9, 2, 6)  # another length and batch than the example: both stay run-time sizes
    for lstm in (by_parametrize, by_hook, by_parametrization):
        model = _Wrap(lstm).eval()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compiled = pbtvm.compile(model, (torch.randn(5, 3, 6),), bits=16, act_bits=16)
        assert not [w for w in seen if "assigned during export" in str(w.message)]  # a hook's, harmless here
        with torch.no_grad():
            want = model(x)
        for got, ref in zip(compiled(x), want, strict=True):
            assert _rel(got, ref) <= 1e-3
        names = [layer["name"] for layer in compiled.manifest["layers"]["converted"]]
        assert all(name.startswith("lstm.weight_") for name in names), names  # computed ones named too
    with torch.no_grad():
        want, step = by_hook(x)[0], by_hook(x[:1])[0][0]
        by_hook.weight_ih_l0 = torch.zeros(32, 6)  # what a hook left is stale: compile_lstm and the decoder compute it
    assert _rel(compile_lstm(by_hook, bits=16, act_bits=16)(x)[0], want) <= 1e-3
    assert _rel(compile_decoder(by_hook, bits=16, act_bits=16, batch=2)(x[0])[0], step) <= 1e-3


@pytest.mark.parametrize("fold_constants", [False, True])
def test_static_shape_outputs_are_not_shared_between_calls(fold_constants, monkeypatch):
    """With static shapes the sequence output buffer must still be made per call: built as
    zeros(), TVM's FoldConstant (in its GPU pipeline) made it one VM constant, so the second
    call overwrote the first call's output."""
    import pbtvm.cuda
    from pbtvm._tvm import relax, tvm

    if fold_constants:  # the GPU pipeline's folding, on the CPU build
        fusion = pbtvm.cuda.cpu_fusion
        monkeypatch.setattr(
            pbtvm.cuda,
            "cpu_fusion",
            lambda: tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.FoldConstant(), fusion()]),
        )
    torch.manual_seed(1)
    lstm = torch.nn.Sequential(torch.nn.LSTM(4, 8, 2)).eval()
    compiled = pbtvm.compile(lstm, (torch.randn(3, 2, 4),), bits=8, dynamic_batch=False)
    x1, x2 = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    y1, _ = compiled(x1)
    kept = y1.clone()
    compiled(x2)
    assert torch.equal(y1, kept)
    with torch.no_grad():
        assert _rel(y1, lstm(x1)[0]) <= 1e-2


def test_one_tensor_as_two_example_inputs_stays_two_inputs():
    torch.manual_seed(0)
    lm = WordLM().eval()
    zeros = torch.zeros(2, 2, 24)
    compiled = pbtvm.compile(lm, (torch.randint(0, 40, (6, 2)), zeros, zeros), bits=16, act_bits=16)
    tokens, h0, c0 = lm.example(7, 3)
    with torch.no_grad():
        want = _flat(lm(tokens, h0, c0))
    for got, ref in zip(_flat(compiled(tokens, h0, c0)), want, strict=True):
        assert _rel(got, ref) <= 1e-3


def test_exported_so_runs_any_length_in_a_fresh_process(tmp_path):
    lm, compiled = _compiled("word_lm", 8, 8)
    compiled.export(str(tmp_path / "lm.so"))
    cases = []
    for steps in LENGTHS:
        for batch in BATCHES:
            inputs = lm.example(steps, batch)
            with torch.no_grad():
                want = _flat(lm(*inputs))
            got = _flat(compiled(*inputs))
            name = f"T{steps}B{batch}"
            np.savez(tmp_path / f"{name}.npz", *[t.numpy() for t in inputs])
            np.savez(tmp_path / f"{name}_pb.npz", *[t.numpy() for t in got])
            np.savez(tmp_path / f"{name}_torch.npz", *[t.numpy() for t in want])
            cases.append(name)
    child = textwrap.dedent(
        f"""
        import sys
        import numpy as np, tvm, pbtvm, pbtvm.compiler
        assert "torch" not in sys.modules  # as a deployment with only the TVM runtime and numpy
        def boom(*a, **k): raise AssertionError("compiler used after load")
        tvm.compile = boom
        pbtvm.compile = boom
        pbtvm.compiler.compile = boom
        m = pbtvm.load({str(tmp_path / "lm.so")!r})
        for name in {cases!r}:
            inputs = list(np.load({str(tmp_path)!r} + f"/{{name}}.npz").values())
            pb = list(np.load({str(tmp_path)!r} + f"/{{name}}_pb.npz").values())
            ref = list(np.load({str(tmp_path)!r} + f"/{{name}}_torch.npz").values())
            logits, (h, c) = m(*inputs)
            for got, same, want in zip((logits, h, c), pb, ref):
                assert np.array_equal(got, same), name
                err = np.linalg.norm(got - want) / np.linalg.norm(want)
                assert err <= 5e-2, (name, err)
        print("ok")
        """
    )
    run = {"capture_output": True, "text": True, "check": False, "timeout": 600, "env": env_without_torch(force=True)}
    out = subprocess.run([sys.executable, "-c", child], **run)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_compiling_and_running_an_lstm_model_prints_nothing(capfd):
    torch.manual_seed(0)
    tagger = PooledTagger().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = pbtvm.compile(tagger, tagger.example(7, 2), bits=4)
        compiled(*tagger.example(3, 1))
    assert [str(w.message) for w in caught] == []
    out, err = capfd.readouterr()  # TVM's C++ log lines go straight to the file descriptors
    assert out == "" and err == "", (out, err)


def test_builds_for_cuda_without_a_gpu(tmp_path):
    torch.manual_seed(0)
    lm = WordLM().eval()
    compiled = pbtvm.compile(lm, lm.example(6, 2), target={"kind": "cuda", "arch": "sm_90"}, bits=4)
    compiled.export(str(tmp_path / "lm_sm90.so"))
    assert len(compiled.converted_layers) == 5


@pytest.mark.gpu
def test_cuda_matches_cpu_at_any_length():
    torch.manual_seed(0)
    lm = WordLM().eval()
    cpu = pbtvm.compile(lm, lm.example(6, 2), bits=8, act_bits=8)
    gpu = pbtvm.compile(lm, lm.example(6, 2), target="cuda", bits=8, act_bits=8)
    for steps, batch in ((1, 1), (17, 3), (64, 2)):
        inputs = lm.example(steps, batch)
        want = _flat(cpu(*inputs))
        got = _flat(gpu(*(x.cuda() for x in inputs)))
        for g, w in zip(got, want, strict=True):
            assert _rel(g.cpu(), w) <= 1e-4


def test_biases_that_overflow_float32_together_saturate_without_warnings():
    """``b_ih + b_hh`` past float32 is an infinite gate input (as in torch's gates): the lowering
    added them in numpy, which warned of the overflow."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 16).eval()
    with torch.no_grad():
        lstm.bias_ih_l0.fill_(3e38)
        lstm.bias_hh_l0.fill_(3e38)
    x = torch.randn(5, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = pbtvm.compile(lstm, (x,), bits=8)
        y, (h, c) = compiled(x)
    with torch.no_grad():
        want, (_h, want_c) = lstm(x)
    torch.testing.assert_close(torch.as_tensor(np.asarray(y)), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.as_tensor(np.asarray(c)), want_c, atol=1e-5, rtol=0)


class _TaggerOf(torch.nn.Module):
    """Embedding -> 2-layer bidirectional LSTM (batch first) -> Linear, returning the state too."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(40, 8)
        self.rnn = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(32, 40)

    def forward(self, tokens):
        y, (h, c) = self.rnn(self.embedding(tokens))
        return self.head(y), h, c


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_lstms_of_other_float_dtypes_run_in_their_dtype(dtype):
    """A half-precision (or float64) LSTM model was refused ("recurrent layers need float32"): its
    input projections are PB layers of its dtype, its steps run in float32 and the outputs and
    state come back in its dtype, every layer named, at any length and batch."""
    torch.manual_seed(0)
    model = _TaggerOf().to(dtype).eval()
    reference = _TaggerOf().eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    compiled = pbtvm.compile(model, (torch.randint(0, 40, (2, 6)),), bits=8)
    names = [layer["name"] for layer in compiled.manifest["layers"]["converted"]]
    assert len(names) == 9 and "rnn.weight_hh_l1_reverse (LSTM)" in names and names[-1] == "head (Linear)"
    tokens = torch.randint(0, 40, (3, 11))
    outs = compiled(tokens)
    with torch.no_grad():
        want = reference(tokens)
    for out, ref in zip(outs, want, strict=True):
        assert out.dtype == dtype and out.shape == ref.shape
        rel = float((out.double() - ref.double()).abs().max() / ref.double().abs().max())
        assert rel < 2e-2, rel  # W8A8, and the dtype's own rounding (bfloat16: 2^-8)


class _SlicedBatch(torch.nn.Module):
    """The first two rows of the batch of an LSTM's output, and the output minus its first step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(4, 8)

    def forward(self, x):
        return self.rnn(x)[0][:, :2], self.rnn(x)[0] - self.rnn(x)[0][:1]


def test_slices_of_an_lstm_model_s_sizes_hold_at_one():
    """torch.export declares every run-time size of an LSTM model at least 2 (its 0/1
    specialisation); taken as a bound, ``y[:, :2]`` was cast to 2 rows and a batch of 1 failed
    (BoundedSliceShapes, reviewed): bounds are taken as at most 1. ``y[:1]`` holds at length 1;
    ``y[:, :2]`` is 2 long in torch's program (later shapes may come from it), so a batch of 1 is
    refused by name (tests/test_size_bounds.py)."""
    torch.manual_seed(0)
    model = _SlicedBatch().eval()
    with pytest.warns(UserWarning, match=r"dimension 1 of input 0 \(x\) is a run-time size from 2 up.*\[:2\]"):
        compiled = pbtvm.compile(model, (torch.randn(3, 3, 4),), bits=16, act_bits=16)
    for steps, batch in ((1, 2), (1, 3), (4, 2), (5, 2)):
        x = torch.randn(steps, batch, 4)
        with torch.no_grad():
            for got, want in zip(compiled(x), model(x), strict=True):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="size 1 in dimension 1; the compiled model takes 2 or more"):
        compiled(torch.randn(4, 1, 4))


def test_an_lstm_input_whose_shape_the_importer_lost_is_named():
    """``lstm(x - x[:1])``: TVM's importer gives the difference no shape (a broadcast of run-time
    sizes), and the LSTM's converter failed with an AttributeError called a bug in pbtvm."""

    class Centred(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(4, 8)

        def forward(self, x):
            return self.rnn(x - x[:1])[0]

    with pytest.raises(ValueError, match=r"lost the shape of the input of rnn \(LSTM\).*x - x\[0\]"):
        pbtvm.compile(Centred().eval(), (torch.randn(3, 3, 4),), bits=8)
