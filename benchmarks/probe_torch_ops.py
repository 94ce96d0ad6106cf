"""Probe torch ops through ``pbtvm.compile``: each after a PB layer, compared with torch.

Two tables: ``VALUE_OPS`` (elementwise, reductions, norms; run in every ``--dtypes`` dtype at the
example batch) and ``SHAPE_OPS`` (shapes, indexing, integer ops; float32, at batches 5, 1 and 3,
compiled at batch 3). Prints one line per op that fails to build or differs from torch beyond the
dtype's tolerance (``--all``: every op). Run it after a TVM or torch upgrade: the twelfth session
found a silently wrong ``squeeze``, ``median`` and NaN sorts with it, the thirteenth TVM's
cancelling ``group_norm`` and float32 half-precision convolutions (BENCHMARKS.md), each now a test
in ``tests/test_reliability.py``. A few minutes on 2 cores.

    python benchmarks/probe_torch_ops.py --dtypes float32,float16,bfloat16
"""

from __future__ import annotations

import argparse
import warnings

import torch

import pbtvm

F = torch.nn.functional
#: Relative tolerance of the output's max |value| per dtype (W16A16 layer, the dtype's rounding).
TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}

VALUE_OPS = {
    "abs": torch.abs,
    "neg": torch.neg,
    "exp": torch.exp,
    "log": lambda x: torch.log(x.abs() + 1),
    "sqrt": lambda x: x.abs().sqrt(),
    "rsqrt": lambda x: (x.abs() + 1).rsqrt(),
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "erf": torch.erf,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "softplus": F.softplus,
    "elu": F.elu,
    "leaky": F.leaky_relu,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "softmax": lambda x: x.softmax(-1),
    "log_softmax": lambda x: x.log_softmax(-1),
    "layernorm": lambda x: F.layer_norm(x, x.shape[-1:]),
    "rmsnorm": lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
    "sum": lambda x: x.sum(-1),
    "mean": lambda x: x.mean(-1),
    "prod": lambda x: x.prod(-1),
    "var": lambda x: x.var(-1),
    "std": lambda x: x.std(-1),
    "norm": lambda x: x.norm(dim=-1),
    "logsumexp": lambda x: x.logsumexp(-1),
    "cumsum": lambda x: x.cumsum(-1),
    "cumprod": lambda x: x.cumprod(-1),
    "clamp_min": lambda x: x.clamp(min=0.1),
    "sign": torch.sign,
    "floor": torch.floor,
    "round": torch.round,
    "trunc": torch.trunc,
    "frac": torch.frac,
    "fmod": lambda x: torch.fmod(x, 0.7),
    "remainder": lambda x: torch.remainder(x, 0.7),
    "pow": lambda x: x.pow(3),
    "reciprocal": lambda x: (x.abs() + 1).reciprocal(),
    "atan2": lambda x: torch.atan2(x, x + 1),
    "masked_fill": lambda x: x.masked_fill(x > 0, -1.0),
    "where": lambda x: torch.where(x > 0, x, 0.5 * x),
    "any": lambda x: (x > 0).any(-1),
    "all": lambda x: (x > 0).all(-1),
    "count": lambda x: (x > 0).sum(-1),
    "logical_and": lambda x: (x > 0) & (x < 1),
    "logical_xor": lambda x: (x > 0) ^ (x < 1),
    "bool_not": lambda x: ~(x > 0),
    "to_int": lambda x: (x * 10).to(torch.int32),
    "to_float_from_bool": lambda x: (x > 0).to(x.dtype),
    "cummax": lambda x: x.cummax(-1).values,
    "median": lambda x: x.median(-1).values,
    "maximum_scalar": lambda x: torch.maximum(x, torch.zeros_like(x)),
    "dropout_eval": lambda x: F.dropout(x, 0.5, training=False),
    "outer": lambda x: x.unsqueeze(-1) * x.unsqueeze(-2),
    "einsum": lambda x: torch.einsum("bi,bj->bij", x, x),
    "bmm": lambda x: torch.bmm(x.unsqueeze(1), x.unsqueeze(2)).squeeze(),
    "argmax_keep": lambda x: x.argmax(-1, keepdim=True),
    "flip": lambda x: x.flip(-1),
    "roll": lambda x: x.roll(1, -1),
    "repeat": lambda x: x.repeat(1, 2),
    "tril": lambda x: x.unsqueeze(-1).expand(-1, 8, 8).tril(),
    "pad": lambda x: F.pad(x, (1, 2)),
    "square": torch.square,
    "expm1": torch.expm1,
    "log1p": lambda x: torch.log1p(x.abs()),
    "group_norm": lambda x: F.group_norm(x.view(-1, 4, 2) * 4 + 50, 2).flatten(1),
    "instance_norm": lambda x: F.instance_norm(x.view(-1, 2, 4) * 4 + 50).flatten(1),
    "conv1d_dtype": lambda x: F.conv1d(
        x.unsqueeze(1), torch.ones(2, 1, 3, dtype=x.dtype), torch.ones(2, dtype=x.dtype)
    ),
    "interp_dtype": lambda x: F.interpolate(x.unsqueeze(1), scale_factor=2, mode="linear").squeeze(1),
}

SHAPE_OPS = {
    "view_-1": lambda x: x.view(-1),
    "reshape_b": lambda x: x.reshape(x.shape[0], 2, 4),
    "flatten": lambda x: x.unsqueeze(1).flatten(1),
    "unflatten": lambda x: x.unflatten(1, (2, 4)),
    "chunk": lambda x: torch.cat(x.chunk(2, -1)[::-1], -1),
    "split": lambda x: x.split([3, 5], -1)[1],
    "transpose": lambda x: x.t(),
    "gather": lambda x: x.gather(1, torch.argsort(x, 1)),
    "index_select": lambda x: x.index_select(1, torch.tensor([7, 0, 3])),
    "narrow": lambda x: x.narrow(1, 2, 3),
    "select": lambda x: x.select(1, -1),
    "expand": lambda x: x[:, :1].expand(-1, 8),
    "stack": lambda x: torch.stack([x, -x], 1),
    "unbind": lambda x: x.unbind(1)[3],
    "one_hot": lambda x: F.one_hot(x.argmax(-1), 8).float(),
    "mean_batch": lambda x: x.mean(0),
    "softmax_batch": lambda x: x.softmax(0),
    "cumsum_batch": lambda x: x.cumsum(0),
    "step_slice": lambda x: x[:, ::2],
    "neg_slice": lambda x: x[:, -3:],
    "batch_slice": lambda x: x[1:],
    "batch_last": lambda x: x[-1],
    "newaxis": lambda x: x[..., None] * x[:, None, :],
    "T3": lambda x: x.unsqueeze(0).transpose(0, 1),
    "roll_batch": lambda x: x.roll(1, 0),
    "flip_batch": lambda x: x.flip(0),
    "repeat_interleave": lambda x: x.repeat_interleave(2, dim=1),
    "tile": lambda x: x.tile((1, 2)),
    "diag": lambda x: torch.diag_embed(x),
    "triu": lambda x: (x.unsqueeze(-1) * x.unsqueeze(-2)).triu(),
    "argsort_batch": lambda x: x.argsort(0),
    "max_batch": lambda x: x.max(0).values,
    "sum_all": lambda x: x.sum(),
    "size_use": lambda x: x / x.shape[0],
    "numel": lambda x: x * x.numel(),
    "arange_batch": lambda x: x + torch.arange(x.shape[0]).unsqueeze(1),
    "zeros_like_b": lambda x: torch.zeros(x.shape[0], 3) + x[:, :3],
    "masked_fill_row": lambda x: x.masked_fill(x[:, :1] > 0, 0.0),
    "where_scalar": lambda x: torch.where(x > 0, 1.0, -1.0),
    "bucketize": lambda x: torch.bucketize(x, torch.tensor([-1.0, 0.0, 1.0])),
    "clamp_t": lambda x: torch.clamp(x, min=torch.zeros(8)),
    "lerp": lambda x: torch.lerp(x, x.flip(-1), 0.3),
    "addcmul": lambda x: torch.addcmul(x, x, x, value=0.5),
    "baddbmm": lambda x: torch.baddbmm(x.unsqueeze(1), x.unsqueeze(1), torch.eye(8).expand(x.shape[0], 8, 8)),
    "matmul_T": lambda x: x @ x.T,
    "einsum_bt": lambda x: torch.einsum("bi,ci->bc", x, x),
    "cdist": lambda x: torch.cdist(x, x),
    "cosine": lambda x: F.cosine_similarity(x, x.flip(0), -1),
    "normalize": lambda x: F.normalize(x, dim=-1),
    "interp": lambda x: F.interpolate(x.unsqueeze(1), scale_factor=2, mode="linear").squeeze(1),
    "avgpool": lambda x: F.avg_pool1d(x.unsqueeze(1), 2).squeeze(1),
    "maxpool": lambda x: F.max_pool1d(x.unsqueeze(1), 2).squeeze(1),
    "conv1d": lambda x: F.conv1d(x.unsqueeze(1), torch.ones(2, 1, 3)).flatten(1),
    "int_div": lambda x: (x * 10).int() // 3,
    "int_mod": lambda x: (x * 10).int() % 3,
    "floor_div_f": lambda x: torch.floor_divide(x, 0.3),
    "bitwise": lambda x: ((x * 10).int() & 5) | 2,
    "shift": lambda x: (x * 10).int() << 2,
    "abs_int": lambda x: (x * 10).int().abs(),
    "int_neg_div": lambda x: torch.div((x * 10).int(), 3, rounding_mode="trunc"),
    "min_int": lambda x: (x * 10).int().min(-1).values,
}


class AfterLayer(torch.nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 8)
        self.op = op

    def forward(self, x):
        return self.op(self.l1(x))


def compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None if ``got`` matches ``want`` (shape, NaN places, values within the tolerance)."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} vs torch {tuple(want.shape)}"
    if not got.is_floating_point():
        return None if torch.equal(got, want) else f"{int((got != want).sum())} integer values differ"
    if not torch.equal(got.isnan(), want.isnan()):
        return "NaN in other places"
    err = float((got.double() - want.double()).nan_to_num().abs().max())
    scale = max(float(want.double().nan_to_num().abs().max()), 1e-3)
    return None if err <= TOLERANCE[dtype] * scale else f"max error {err:.3g} of {scale:.3g}"


def probe(op, dtype: torch.dtype, batches: tuple[int, ...]) -> str | None:
    """Why ``op`` after a PB layer differs from torch in ``dtype`` at ``batches`` (None: it matches)."""
    torch.manual_seed(0)
    model = AfterLayer(op).eval().to(dtype)
    try:
        compiled = pbtvm.compile(model, (torch.randn(3, 8, dtype=dtype),), bits=16, act_bits=16)
        problems = []
        for batch in batches:
            x = torch.randn(batch, 8, dtype=dtype)
            with torch.no_grad():
                problem = compare(compiled(x), model(x), dtype)
            if problem:
                problems.append(f"batch {batch}: {problem}")
        return "; ".join(problems) or None
    except Exception as err:  # the point is to list every failure
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--ops", default=None, help="comma-separated names (default: every op)")
    ap.add_argument("--all", action="store_true", help="also print the ops that match")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    only = set(args.ops.split(",")) if args.ops else None
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    runs = [(n, op, d, (3,)) for n, op in VALUE_OPS.items() for d in dtypes]
    runs += [(n, op, torch.float32, (5, 1, 3)) for n, op in SHAPE_OPS.items()]
    failed = 0
    for name, op, dtype, batches in runs:
        if only and name not in only:
            continue
        problem = probe(op, dtype, batches)
        failed += problem is not None
        if problem or args.all:
            print(f"{name:<20} {str(dtype).replace('torch.', ''):<9} {problem or 'ok'}", flush=True)
    print(f"{failed} of {len(runs) if not only else sum(n in only for n, *_ in runs)} op runs differ or fail")


if __name__ == "__main__":
    main()
