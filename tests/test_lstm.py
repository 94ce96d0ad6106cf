"""PB LSTM vs torch.nn.LSTM: accuracy bounds, any sequence length, no compiling at run time, step API."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm.lstm import compile_lstm, load_lstm

CONFIGS = [  # (layers, hidden, input, batch_first, bias)
    (1, 32, 20, False, True),
    (2, 48, 24, True, False),
    (2, 33, 17, False, True),  # odd sizes: K not a multiple of 32
]
SHAPES = [(1, 1), (7, 3), (25, 2)]  # (seq_len, batch)


def _lstm(layers, hidden, inp, batch_first, bias, seed=0):
    torch.manual_seed(seed)
    return torch.nn.LSTM(inp, hidden, num_layers=layers, batch_first=batch_first, bias=bias).eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("bits", "act_bits", "bound"), [(16, 16, 1e-3), (8, 8, 5e-2)])
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"L{c[0]}H{c[1]}I{c[2]}{'bf' if c[3] else ''}{'b' if c[4] else 'nb'}"
)
def test_matches_torch_lstm(config, bits, act_bits, bound):
    lstm = _lstm(*config)
    m = compile_lstm(lstm, "llvm", bits, act_bits)
    layers, hidden, inp, batch_first, _ = config
    for steps, batch in SHAPES:
        x = torch.randn(batch, steps, inp) if batch_first else torch.randn(steps, batch, inp)
        h0 = torch.randn(layers, batch, hidden) * 0.5
        c0 = torch.randn(layers, batch, hidden) * 0.5
        with torch.no_grad():
            ref, (rh, rc) = lstm(x, (h0, c0))
        y, (h, c) = m(x, (h0, c0))
        assert y.shape == ref.shape and h.shape == rh.shape
        for got, want, what in ((y, ref, "output"), (h, rh, "h_n"), (c, rc, "c_n")):
            assert _rel(got, want) <= bound, f"{what} T={steps} B={batch}: {_rel(got, want):.2e} > {bound}"


def test_step_api_decodes_hundreds_of_tokens_like_the_unrolled_run():
    lstm = _lstm(2, 40, 16, False, True)
    m = compile_lstm(lstm, "llvm", 4)
    steps = 300
    x = torch.randn(steps, 2, 16)
    full, (hf, cf) = m(x)
    state = None
    outs = []
    for t in range(steps):
        y, state = m.step(x[t], state)
        outs.append(y)
    np.testing.assert_allclose(torch.stack(outs).numpy(), full.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state[0].numpy(), hf.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state[1].numpy(), cf.numpy(), rtol=1e-6, atol=1e-6)


def test_any_length_without_compiling_in_a_fresh_process(tmp_path):
    lstm = _lstm(2, 24, 12, True, True)
    m = compile_lstm(lstm, "llvm", 8)
    m.export(tmp_path / "lstm")
    x = torch.randn(3, 41, 12)  # a length nothing was compiled for
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", m(x)[0].numpy())
    child = textwrap.dedent(
        f"""
        import numpy as np, torch, tvm, pbtvm
        def boom(*a, **k): raise AssertionError("compiler used after load")
        tvm.compile = boom
        pbtvm.compile = boom
        pbtvm.compiler.compile = boom
        from pbtvm.lstm import load_lstm
        m = load_lstm({str(tmp_path / "lstm")!r})
        x = torch.from_numpy(np.load({str(tmp_path / "x.npy")!r}))
        for steps in (1, 5, 41, 97):
            y, (h, c) = m(torch.randn(2, steps, 12))
            assert y.shape == (2, steps, 24), y.shape
        assert np.array_equal(m(x)[0].numpy(), np.load({str(tmp_path / "y.npy")!r}))
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_bitlayers_knob_reaches_every_kernel():
    lstm = _lstm(1, 32, 16, False, True)
    m = compile_lstm(lstm, "llvm", 8)
    x = torch.randn(10, 2, 16)
    with torch.no_grad():
        ref = lstm(x)[0]
    errs = [_rel(m(x, bitlayers=n)[0], ref) for n in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="takes a torch.nn.LSTM"):
        compile_lstm(torch.nn.GRU(4, 4))
    from pbtvm.decoder import compile_decoder

    for api in (compile_lstm, compile_decoder):  # one set of checks, naming the call
        with pytest.raises(ValueError, match=rf"pbtvm.{api.__name__}: the LSTM is bidirectional"):
            api(torch.nn.LSTM(4, 4, bidirectional=True))
        with pytest.raises(ValueError, match=rf"pbtvm.{api.__name__}: the LSTM has proj_size=2"):
            api(torch.nn.LSTM(4, 4, proj_size=2))
    with pytest.raises(ValueError, match="bits"):
        compile_lstm(torch.nn.LSTM(4, 4), bits=17)
    m = compile_lstm(torch.nn.LSTM(4, 8), "llvm", 4)
    with pytest.raises(ValueError, match=r"\[T, B, 4\]"):
        m(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="state must be"):
        m(torch.randn(3, 2, 4), (torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)))
    with pytest.raises(TypeError, match="float32"):
        m(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(FileNotFoundError, match="lstm.json"):
        load_lstm(tmp_path)
    (tmp_path / "lstm.json").write_text("{")
    with pytest.raises(pbtvm.LibraryError, match="corrupt"):
        load_lstm(tmp_path)


def test_compile_on_a_model_with_an_lstm_lowers_it_for_any_length():
    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(4, 8)

        def forward(self, x):
            return self.rnn(x)[0]

    import warnings

    tagger = Tagger().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unroll warning, no torch _flat_weights warning
        m = pbtvm.compile(tagger, (torch.randn(3, 2, 4),), bits=8)
    x = torch.randn(11, 2, 4)  # another length than the example's
    with torch.no_grad():
        assert _rel(m(x), tagger(x)) <= 5e-2


def test_an_exported_directory_is_one_export(tmp_path):
    """Pieces of two exports, an export stopped part-way, or an edited lstm.json loaded and ran a
    model that was neither (or reported a format the kernels did not have)."""
    import json
    import shutil

    from pbtvm.library import LibraryError

    torch.manual_seed(0)
    first, second = (compile_lstm(torch.nn.LSTM(8, 16, num_layers=2), "llvm", 4) for _ in range(2))
    a, b = first.export(tmp_path / "a"), second.export(tmp_path / "b")
    x = torch.randn(5, 2, 8)
    assert torch.equal(load_lstm(a)(x)[0], first(x)[0])
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(b / "cell1.so", mixed / "cell1.so")
    with pytest.raises(LibraryError, match=r"cell1.so is not the file exported with .*lstm.json"):
        load_lstm(mixed)
    edited = tmp_path / "edited"
    shutil.copytree(a, edited)
    meta = json.loads((edited / "lstm.json").read_text())
    (edited / "lstm.json").write_text(json.dumps({**meta, "batch_first": True}))
    with pytest.raises(LibraryError, match="was changed after export"):
        load_lstm(edited)

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    second._cells[1].export = stopped  # an export over `a` stopped before its last piece
    with pytest.raises(KeyboardInterrupt):
        second.export(a)
    with pytest.raises(FileNotFoundError, match="lstm.json is missing"):
        load_lstm(a)
    with pytest.raises(LibraryError, match="is a file; load_lstm takes the directory"):
        load_lstm(b / "proj0.so")
