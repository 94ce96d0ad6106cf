"""User mistakes get an error naming the mistake, and models written in less common forms work
(a newcomer's findings, the twenty-fifth session): ``forward(*args)`` keeps its dynamic batch,
an empty example, non-tensor outputs, calibration batches, counts, ``compile_lstm`` arguments,
empty export paths, and the layer list of an LSTM run twice."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm.decoder import compile_decoder
from pbtvm.errors import InputError, InputTypeError
from pbtvm.lstm import compile_lstm


def _compile(model, *example, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pbtvm.compile(model.eval(), example, **{"bits": 8, **kw})


class VarArgs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, first, *rest):
        return self.fc(first) + self.fc(rest[1]) * rest[0][:, :8]


def test_a_forward_taking_star_args_keeps_its_dynamic_batch():
    torch.manual_seed(0)
    model = VarArgs().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not be made dynamic" warning
        compiled = pbtvm.compile(model, tuple(torch.randn(4, 16) for _ in range(3)), bits=8)
    assert compiled.manifest["dynamic_batch"]
    for batch in (1, 5):
        xs = tuple(torch.randn(batch, 16) for _ in range(3))
        want = model(*xs)
        assert (compiled(*xs) - want).abs().max() < 0.03 * want.abs().max()


def test_star_args_given_nothing_keep_the_dynamic_batch_too():
    torch.manual_seed(0)

    class Rest(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x, y=None, *rest):
            return self.fc(x) + (0 if y is None else y) + sum(rest)

    for example in ((torch.randn(3, 4),), (torch.randn(3, 4),) * 2, (torch.randn(3, 4),) * 3):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compiled = pbtvm.compile(Rest().eval(), example, bits=8)
        assert compiled.manifest["dynamic_batch"], len(example)
        assert compiled(*[torch.randn(5, 4) for _ in example]).shape == (5, 4)


def test_an_empty_example_is_refused_at_compile_time():
    with pytest.raises(InputError, match=r"example input 0 is empty \(shape \(0, 16\)\)"):
        pbtvm.compile(torch.nn.Linear(16, 8).eval(), (torch.randn(0, 16),))


def test_a_size_the_example_fixed_is_named_as_such():
    """Outside LSTMs only the batch is a run-time size: a sequence of another length was refused
    without saying that the example's length is the only one."""
    compiled = _compile(torch.nn.Linear(16, 8), torch.randn(2, 8, 16))
    assert compiled(torch.randn(3, 8, 16)).shape == (3, 8, 8)
    with pytest.raises(
        InputError, match=r"expects \(batch, 8, 16\); dimension 1 \(8\): fixed at the example's size, compile"
    ):
        compiled(torch.randn(2, 5, 16))
    with pytest.raises(InputError, match=r"expects \(batch, 8, 16\)$"):  # another rank: nothing to add
        compiled(torch.randn(2, 16))


class WithCount(torch.nn.Module):
    def __init__(self, extra) -> None:
        super().__init__()
        self.fc, self.extra = torch.nn.Linear(8, 4), extra

    def forward(self, x):
        return self.fc(x), self.extra


@pytest.mark.parametrize(("extra", "named"), [(3, r"an int \(3\)"), ("n", r"a str \('n'\)")])
def test_a_non_tensor_output_is_named(extra, named):
    with pytest.raises(InputTypeError, match=rf"the model returns {named}; pbtvm models return tensors"):
        pbtvm.compile(WithCount(extra).eval(), (torch.randn(2, 8),))


def test_calibration_mistakes_are_named():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    with pytest.raises(InputError, match=r"calibration batch 1 \(\[8, 7\] float32\) does not run through the model"):
        _compile(model, x, bits=2, calibration=[torch.randn(4, 8), torch.randn(8, 7)])
    with pytest.raises(InputError, match=r"the inputs of 1 \(Linear\) hold NaN or inf"):
        _compile(model, x, bits=2, calibration=[torch.full((8, 8), float("nan"))])
    for bad in (5, torch.randn(4, 8)):  # a tensor is one batch, not an iterable of them
        with pytest.raises(InputTypeError, match="calibration takes an iterable of batches"):
            _compile(model, x, bits=2, calibration=bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tune": True, "trials": 0, "work_dir": "unused"}, "trials must be >= 1, got 0"),
        ({"tune": True, "trials": -5, "work_dir": "unused"}, "trials must be >= 1, got -5"),
        ({"tune_batch": 0}, "tune_batch must be >= 1, got 0"),
        ({"tune_batch": 2.0}, "tune_batch must be an int >= 1, got float 2.0"),
    ],
)
def test_counts_are_checked(kwargs, match):
    with pytest.raises(InputError, match=match):
        pbtvm.compile(torch.nn.Linear(8, 4).eval(), (torch.randn(2, 8),), **kwargs)


def test_integer_arguments_share_one_check():
    """Python and numpy integers are taken (and become Python ints: manifests are JSON); bools,
    floats and strings are type errors, naming the argument and its range."""
    from pbtvm.bitplane import BitplaneFormat
    from pbtvm.errors import check_int

    assert check_int("n", np.int16(3), 1) == 3 and type(check_int("n", np.uint64(3), 1, 4)) is int
    for bad, cls, said in (
        (True, InputTypeError, "n must be an int in 1..4, got bool True"),
        (2.0, InputTypeError, "n must be an int in 1..4, got float 2.0"),
        ("2", InputTypeError, "n must be an int in 1..4, got str '2'"),
        (5, InputError, "n must be in 1..4, got 5"),
    ):
        with pytest.raises(cls, match=said):
            check_int("n", bad, 1, 4)
    fmt = BitplaneFormat(np.int64(4), np.int32(8))
    assert type(fmt.bits) is int and type(fmt.act_bits) is int and fmt == BitplaneFormat(4, 8)
    assert type(fmt.check_bitlayers(np.int8(2))) is int
    lstm = torch.nn.LSTM(8, 8)
    with pytest.raises(InputTypeError, match="batch must be an int >= 1, got bool True"):
        compile_decoder(lstm, batch=True)  # was batch 1
    dec = compile_decoder(lstm, batch=np.int64(2))
    assert dec.batch == 2 and type(dec.model.manifest["decoder"]["batch"]) is int


def test_tune_checks_its_batch(tmp_path):
    with pytest.raises(InputError, match="batch must be >= 1, got 0"):
        pbtvm.tune(torch.nn.Linear(8, 4).eval(), (torch.randn(2, 8),), work_dir=tmp_path, batch=0)


def test_compile_lstm_arguments():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(12, 20).eval()
    with pytest.raises(InputError, match="compile_lstm's layers take any batch and sequence length"):
        compile_lstm(lstm, bits=4, dynamic_batch=False)
    compiled = compile_lstm(lstm, bits=4)
    x, h0, c0 = torch.randn(5, 3, 12), torch.randn(1, 3, 20), torch.randn(1, 3, 20)
    y, (h, c) = compiled(x, (h0, c0))
    y_np, (h_np, c_np) = compiled(x, (h0.numpy(), c0.numpy()))  # the state as numpy, as x may be
    assert torch.equal(y, y_np) and torch.equal(h, h_np) and torch.equal(c, c_np)
    with pytest.raises(InputTypeError, match="h0 must be float32, got torch.float64"):
        compiled(x, (h0.double(), c0))
    with pytest.raises(InputTypeError, match=r"state must be a pair \(h0, c0\)"):
        compiled(x, h0)
    with pytest.raises(InputError, match="export needs a directory"):
        compiled.export("")


def test_export_to_an_empty_path_is_named():
    compiled = _compile(torch.nn.Linear(8, 4), torch.randn(2, 8))
    with pytest.raises(InputError, match="export needs a file path"):
        compiled.export("")


def test_an_lstm_run_twice_is_listed_twice():
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 12)

        def forward(self, x):
            return self.lstm(self.lstm(x)[0][..., :8])[0]

    compiled = _compile(Twice(), torch.randn(5, 2, 8), bits=4)
    names = [layer["name"] for layer in compiled.manifest["layers"]["converted"]]
    assert names == ["lstm.weight_ih_l0 (LSTM)", "lstm.weight_hh_l0 (LSTM)"] * 2


def test_generate_on_a_decoder_without_head_says_what_it_needs():

    torch.manual_seed(0)
    dec = compile_decoder(torch.nn.LSTM(8, 8).eval(), bits=4, embedding=torch.nn.Embedding(10, 8))
    with pytest.raises(InputError, match=r"needs an embedding and a head .*head=\.\.\."):
        dec.generate(np.array([1, 2]), 3)


def test_a_model_for_a_cpu_this_one_lacks_is_refused_at_the_call(monkeypatch):
    """Compiled here for another CPU (e.g. target alderlake on a CPU without AVX-VNNI), the call is
    refused as pbtvm.load refuses such a library, instead of an illegal instruction killing the
    process; PBTVM_SKIP_CPU_CHECK takes 1/true/yes/on only."""
    from pbtvm import runtime

    compiled = _compile(torch.nn.Linear(8, 4), torch.randn(2, 8))
    monkeypatch.setattr(runtime, "missing_cpu_features", lambda _needed: ["avx512fp16"])
    with pytest.raises(
        InputError, match=r"this model was compiled for a CPU with avx512fp16 .* or run it on such a CPU"
    ):
        compiled(torch.randn(2, 8))
    for value, skips in (("1", True), ("true", True), ("ON", True), ("0", False), ("false", False), ("no", False)):
        monkeypatch.setenv("PBTVM_SKIP_CPU_CHECK", value)
        assert runtime.skip_cpu_check() is skips, value
    monkeypatch.setenv("PBTVM_SKIP_CPU_CHECK", "1")
    assert compiled(torch.randn(2, 8)).shape == (2, 4)


def test_cpu_kernel_variable_takes_popcount_in_any_case_and_names_other_values(monkeypatch):
    """PBTVM_CPU_KERNEL=POPCOUNT forces the portable kernels too; a value it does not know is named
    in a warning (a typo used to keep the default kernels without a word)."""
    from pbtvm.target import popcount_forced

    for value, forced in (("popcount", True), (" POPCOUNT ", True), ("", False)):
        monkeypatch.setenv("PBTVM_CPU_KERNEL", value)
        assert popcount_forced() is forced, value
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcnt-typo")
    with pytest.warns(UserWarning, match="PBTVM_CPU_KERNEL='popcnt-typo' is ignored: its only value is 'popcount'"):
        assert popcount_forced() is False


def test_a_loaded_library_is_checked_once_by_load(monkeypatch, tmp_path):
    """pbtvm.load decides (here with the check skipped); the first call does not decide again."""
    from pbtvm import runtime

    path = _compile(torch.nn.Linear(8, 4), torch.randn(2, 8)).export(tmp_path / "m.so")
    monkeypatch.setattr(runtime, "missing_cpu_features", lambda _needed: ["avx512fp16"])
    with pytest.raises(pbtvm.LibraryError, match="compiled for a CPU with avx512fp16"):
        pbtvm.load(path)
    monkeypatch.setenv("PBTVM_SKIP_CPU_CHECK", "1")
    loaded = pbtvm.load(path)
    monkeypatch.delenv("PBTVM_SKIP_CPU_CHECK")
    assert loaded(torch.randn(2, 8)).shape == (2, 4)


def test_compiled_models_refuse_pickle_with_the_way_to_save_them():
    import copy
    import pickle

    compiled = _compile(torch.nn.Linear(8, 4), torch.randn(2, 8))
    lstm = compile_lstm(torch.nn.LSTM(8, 8).eval(), bits=4)
    dec = compile_decoder(torch.nn.LSTM(8, 8).eval(), bits=4)
    for model, how in (
        (compiled, r"pbtvm\.load\(path\)"),
        (lstm, r"load_lstm\(directory\)"),
        (dec, r"load_decoder\(path\)"),
    ):
        for save in (pickle.dumps, copy.copy, copy.deepcopy, lambda m: torch.save(m, __import__("io").BytesIO())):
            with pytest.raises(TypeError, match=rf"cannot be pickled or copied .*{how}"):
                save(model)


def test_torchscript_submodules_are_named():
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript: what users still have
                warnings.simplefilter("ignore", DeprecationWarning)
                self.a = torch.jit.script(torch.nn.Linear(8, 8))
            self.b = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(InputTypeError, match=r"eager torch modules; a is TorchScript"):
        pbtvm.compile(Mixed().eval(), (torch.randn(2, 8),))


def test_decoder_arguments_out_of_range_are_named():

    torch.manual_seed(0)
    dec = compile_decoder(
        torch.nn.LSTM(8, 8).eval(), bits=4, embedding=torch.nn.Embedding(10, 8), head=torch.nn.Linear(8, 10)
    )
    for n in (2**40, 2**70):  # was a MemoryError('') and an OverflowError
        with pytest.raises(InputError, match=r"max_new_tokens must be at most 2,147,483,647 per call"):
            dec.generate(np.array([1, 2]), n)
    h, c = dec.initial_state()
    with pytest.raises(InputTypeError, match=r"state must be a pair \(h, c\), got 3 items"):
        dec(np.array([1]), (h, c, c))
