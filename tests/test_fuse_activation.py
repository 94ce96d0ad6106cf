"""``FuseActivationIntoPB``: a PB layer's ReLU folded into its binary-tensor-core kernel on CUDA.

The kernels themselves (the relu in the epilogue, NaN kept) run in ``tests/test_bmma_emulated.py``
(``test_activation_in_the_epilogue_in_emulation``) and on a GPU in ``tests/test_bmma_gpu.py`` (models with
ReLU against the CPU build); whole fused graphs (3-D, fp16, NaN rows) run on the CPU here, their PB
functions as TE computes, against the same graphs unfused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pbtvm import bitplane as bp
from pbtvm import compiler, kernels, names
from pbtvm._tvm import relax, tir, tvm
from pbtvm.compiler import _rewrite
from pbtvm.relay_passes import ApplyPBSchedules, FuseActivationIntoPB
from pbtvm.target import resolve_target

from .models import MLP

SM90 = resolve_target({"kind": "cuda", "arch": "sm_90"})
MMA = bp.BitplaneFormat(4, 8, layout="mma16x256")


def _ops(mod: tvm.IRModule) -> list[str]:
    """Names of the ops and called functions in ``main``, in order."""
    seen = []

    def visit(node) -> None:
        if isinstance(node, relax.Call):
            if isinstance(node.op, tvm.ir.Op) and node.op.name == "relax.call_tir":
                seen.append(node.args[0].name_hint)
            elif isinstance(node.op, tvm.ir.Op):
                seen.append(node.op.name)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return seen


def _rewritten(model: torch.nn.Module, example: torch.Tensor, target=SM90, fmt=MMA) -> tvm.IRModule:
    return _rewrite(model.eval(), (example,), fmt, target, True)[0]


def _activation(mod: tvm.IRModule, name: str) -> str | None:
    value = (mod[name].attrs or {}).get(names.ATTR_ACTIVATION)
    return None if value is None else str(value)


def test_mlp_relus_go_into_the_layers():
    """Each Linear + ReLU of the MLP is one call; the last layer (no ReLU) is unchanged, and the
    functions the relus were folded out of are gone."""
    torch.manual_seed(0)
    mod = _rewritten(MLP((300, 130, 64, 10)), torch.randn(2, 300))
    ops = _ops(mod)
    assert not {"relax.nn.relu", "relax.isnan", "relax.where"} & set(ops)
    calls = [op for op in ops if op.startswith("pb_")]
    assert calls == [
        "pb_dense_act_w4a8o_mma16x256_n130_k300_bias_relu",
        "pb_dense_act_w4a8o_mma16x256_n64_k130_bias_relu",
        "pb_dense_act_w4a8o_mma16x256_n10_k64_bias",
    ]
    assert [_activation(mod, c) for c in calls] == ["relu", "relu", None]
    assert sorted(gv.name_hint for gv in mod.get_global_vars()) == sorted(["main", *calls])


class _Sequence(torch.nn.Module):
    """Linear + ReLU on a [B, T, F] input: the rewrite reshapes to rows and back."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 96), torch.nn.Linear(96, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class _HalfReLU(torch.nn.Module):
    """An fp16 layer: the rewrite computes in float32 and casts back before the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 96).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x))


@pytest.mark.parametrize(
    ("model", "example"),
    [(_Sequence, torch.randn(2, 5, 64)), (_HalfReLU, torch.randn(3, 64).half())],
    ids=["reshape", "astype"],
)
def test_relu_after_a_reshape_or_cast_of_the_layer_goes_in(model, example):
    """relu commutes with the rewrite's reshape back to [B, T, N] and its cast back to fp16: the
    ReLU goes into the layer, the reshape / cast stays after it."""
    torch.manual_seed(0)
    mod = _rewritten(model(), example)
    ops = _ops(mod)
    assert "relax.nn.relu" not in ops and "relax.where" not in ops
    (first,) = [op for op in ops if op.startswith("pb_") and op.endswith("_relu")]
    assert _activation(mod, first) == "relu"
    after = ops[ops.index(first) + 1 :]
    assert after[0] == ("relax.reshape" if model is _Sequence else "relax.astype")


class _ReadTwice(torch.nn.Module):
    """The layer's output is read by the ReLU and by an add: the ReLU cannot go in."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return torch.relu(y) + y


def test_relu_of_an_output_read_elsewhere_stays_a_kernel():
    torch.manual_seed(0)
    mod = _rewritten(_ReadTwice(), torch.randn(2, 64))
    ops = _ops(mod)
    assert "relax.nn.relu" in ops and not any(op.endswith("_relu") for op in ops)


@pytest.mark.parametrize(
    ("target", "fmt"),
    [
        (resolve_target("llvm"), bp.BitplaneFormat(4, 8)),
        (resolve_target({"kind": "cuda", "arch": "sm_75"}), bp.BitplaneFormat(4, 8)),  # CUDA-core layout
    ],
    ids=["cpu", "cuda-core"],
)
def test_relu_stays_a_kernel_where_the_layer_is_not_on_binary_tensor_cores(target, fmt):
    torch.manual_seed(0)
    mod = _rewritten(MLP((40, 32, 10)), torch.randn(2, 40), target, fmt)
    assert "relax.nn.relu" in _ops(mod)
    assert all(names.ATTR_ACTIVATION not in (f.attrs or {}) for _, f in mod.functions_items())


def test_an_activation_outside_the_tensor_core_layout_is_refused():
    """Only the binary-tensor-core kernels apply the epilogue's activation: a CPU kernel built
    from the format would drop it (the AVX-512 one gave outputs down to -44 for a relu), so
    scheduling one is an error naming the function, in a module and alone."""
    func = kernels.dense_func(bp.BitplaneFormat(4, 8), 16, 64, activation="relu").without_attr("global_symbol")
    mod = tvm.IRModule({"layer": func})
    with pytest.raises(ValueError, match="layer: its epilogue applies relu"):
        ApplyPBSchedules(resolve_target("llvm"))(mod)
    with pytest.raises(ValueError, match="epilogue applies relu, which only the mma16x256"):
        kernels.build(func, resolve_target("llvm"))


class _TwoHeads(torch.nn.Module):
    """Two layers reading one input (one shared activation pack: ``pb_dense`` layers), each with a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(300, 130), torch.nn.Linear(300, 130)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x)) * torch.relu(self.b(x))


def test_layers_sharing_an_activation_pack_take_their_relus():
    torch.manual_seed(0)
    mod = _rewritten(_TwoHeads(), torch.randn(40, 300))  # a batch past the one-launch range
    calls = [op for op in _ops(mod) if op.startswith("pb_")]
    assert calls[0].startswith("pb_act_pack") and len(calls) == 3
    assert all(c.startswith("pb_dense_w4") and c.endswith("_relu") for c in calls[1:])
    assert "relax.nn.relu" not in _ops(mod) and relax.analysis.check_well_formed(mod)


def test_an_activation_outside_the_layers_dataflow_block_stays_a_kernel():
    """The fused call takes the activation's place: only inside the layer's dataflow block are its
    inputs in scope there (and nothing writes them in between)."""
    fmt, n, k = MMA, 64, 256
    func = kernels.dense_act_func(fmt, n, k, bias=False).without_attr("global_symbol")
    x = relax.Var("x", relax.TensorType([2, k], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        gv = bb.add_func(func, "layer")
        with bb.dataflow():
            rows = bb.emit(relax.op.reshape(x, [2, k]))
            wp = relax.const(np.zeros(fmt.weight_shape(n, k), np.uint32), "uint32")
            ws = relax.const(np.ones(fmt.scale_shape(n), np.float32), "float32")
            layers = relax.prim_value(tir.IntImm("int64", 4))
            out = bb.emit_output(relax.call_tir(gv, [rows, wp, ws, layers], relax.TensorType([2, n], "float32")))
        bb.emit_func_output(bb.emit(relax.op.nn.gelu(out)))
    mod = FuseActivationIntoPB()(bb.get())
    assert "relax.nn.gelu" in _ops(mod) and relax.analysis.check_well_formed(mod)


class _FeedForward(torch.nn.Module):
    """Linear, then ``act``, then Linear (a transformer's MLP)."""

    def __init__(self, act) -> None:
        super().__init__()
        self.act, self.up, self.down = act, torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize(
    ("act", "op", "activation"),
    [
        (torch.nn.GELU(), "relax.nn.gelu", "gelu"),
        (torch.nn.GELU(approximate="tanh"), "relax.nn.gelu_tanh", "gelu_tanh"),
        (torch.nn.SiLU(), "relax.sigmoid", "silu"),  # torch imports it as x * sigmoid(x)
    ],
    ids=["gelu", "gelu_tanh", "silu"],
)
def test_gelu_and_silu_go_into_the_layer(act, op, activation):
    torch.manual_seed(0)
    mod = _rewritten(_FeedForward(act), torch.randn(2, 5, 64))  # 3-D: through the rewrite's reshape
    ops = _ops(mod)
    assert op not in ops
    (first,) = [o for o in ops if o.endswith(f"_{activation}")]
    assert _activation(mod, first) == activation


def test_gelu_after_a_cast_to_half_stays_a_kernel():
    """A cast to fp16 before GELU rounds its input: computing GELU in float32 first is another
    result, so the layer keeps it out (relu, exact either way, goes in: see above)."""
    torch.manual_seed(0)
    mod = _rewritten(_FeedForward(torch.nn.GELU()).half(), torch.randn(2, 64).half())
    assert "relax.nn.gelu" in _ops(mod)


def _run_on_cpu(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    """``main(x, bitlayers=4)`` of a rewritten module built for ``llvm`` as it stands: the PB
    functions unscheduled, i.e. their TE computes (the mma16x256 layout's semantics) run serially."""
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.ShapeTuple([4]))
    return (out[0] if isinstance(out, tvm.ir.Array) else out).numpy()  # torch import: (out,)


@pytest.mark.parametrize(
    ("model", "shape", "dtype", "activation"),
    [
        (lambda: MLP((70, 96, 40, 10)), (3, 70), torch.float32, "relu"),
        (_Sequence, (2, 5, 64), torch.float32, "relu"),
        (_HalfReLU, (3, 64), torch.float16, "relu"),
        (lambda: _FeedForward(torch.nn.GELU()), (2, 5, 64), torch.float32, "gelu"),
        (lambda: _FeedForward(torch.nn.GELU(approximate="tanh")), (4, 64), torch.float32, "gelu_tanh"),
        (lambda: _FeedForward(torch.nn.SiLU()), (2, 3, 64), torch.float32, "silu"),
    ],
    ids=["mlp", "reshape", "half", "gelu-3d", "gelu_tanh", "silu-3d"],
)
def test_fused_models_compute_what_the_unfused_ones_do(model, shape, dtype, activation, monkeypatch):
    """End to end on the CPU: the sm_90 graph with the activations in the layers equals the same
    graph with them as ops of their own (float32 epilogue vs TVM's op on the same float32 values:
    within 1e-6), a NaN input row included; both near torch (W4A8: relative RMS error < 0.2)."""
    torch.manual_seed(0)
    net = model().eval()
    example = torch.randn(shape).to(dtype)
    x = example.clone()
    x[0, ..., 3] = float("nan")  # relu / gelu / silu keep a NaN row NaN, fused or not
    fused = _rewritten(net, example)
    assert activation in {_activation(fused, gv.name_hint) for gv in fused.get_global_vars()}
    monkeypatch.setattr(compiler, "FuseActivationIntoPB", lambda: lambda mod: mod)
    plain = _rewritten(net, example)
    assert not any(_activation(plain, gv.name_hint) for gv in plain.get_global_vars())
    got, want = _run_on_cpu(fused, x.numpy()), _run_on_cpu(plain, x.numpy())
    assert np.isnan(got[0]).all() and not np.isnan(got[1:]).any()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        ref = net(x).float().numpy()[1:]
    assert np.linalg.norm(got[1:] - ref) < 0.2 * np.linalg.norm(ref)
