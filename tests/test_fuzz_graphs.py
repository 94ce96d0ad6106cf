"""Seeded fuzzing: randomly composed small torch graphs compile and match torch.

Each random graph is a chain over one input: Linear layers with and without bias, two Linears
reading the same tensor (GLU, residual, concatenation), negative-index selection and slicing,
elementwise ops; graphs run in float32, float16 or bfloat16. Twenty graphs share one compiled
module (each reads one of three inputs of different dtypes; the module returns their outputs as a
tuple, a dict or nested), so 140 graphs cost 7 compilations. W16A16 keeps the PB error far
below the dtypes' own rounding, so the tolerance is the dtype's: a wrong index, dropped bias or
lost output is caught, PB rounding is not.

Reproduce one module: ``PBTVM_SEED=<seed> pytest tests/test_fuzz_graphs.py -k 'module and <i>'``.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch

import pbtvm

MODULES = 7
GRAPHS_PER_MODULE = 20
SEED = int(os.environ.get("PBTVM_SEED", 18))
WIDTHS = (8, 12, 16)  # few distinct kernel shapes: TVM builds each once per module
#: Relative tolerance (of the output's max |value|) per dtype: torch itself rounds every op there.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
INPUTS = ((torch.float32, (3, 4, 16)), (torch.float16, (3, 12)), (torch.bfloat16, (3, 4, 8)))


class RandomGraph(torch.nn.Module):
    """A random chain of ops on one input of shape [B, F] or [B, S, F]."""

    def __init__(self, rng: random.Random, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.lins = torch.nn.ModuleList()
        self.program: list[tuple] = []
        dim, rank = shape[-1], len(shape)
        for _ in range(rng.randint(2, 5)):
            ops = ["linear", "glu", "act", "scale", "tail", "cat", "residual"] + ["last", "row"] * (rank == 3)
            op = rng.choice(ops)
            if op == "linear":
                out = rng.choice(WIDTHS)
                self.program.append(("linear", self._lin(rng, dim, out)))
                dim = out
            elif op == "glu":
                out = rng.choice(WIDTHS)
                self.program.append(("glu", self._lin(rng, dim, out), self._lin(rng, dim, out)))
                dim = out
            elif op == "act":
                self.program.append(("act", rng.choice(["tanh", "relu", "sigmoid"])))
            elif op == "scale":
                self.program.append(("scale", rng.choice([0.5, -1.5, 2.0]), rng.choice([0.0, 0.25])))
            elif op == "tail":
                keep = rng.randint(1, dim)
                self.program.append(("tail", keep))
                dim = keep
            elif op == "cat":
                out = rng.choice(WIDTHS)
                self.program.append(("cat", self._lin(rng, dim, out)))
                dim += out
            elif op == "residual":
                self.program.append(("residual", self._lin(rng, dim, dim)))
            else:  # "last" (h[:, -1]) or "row" (h[:, -2]): a negative constant index, rank 3 -> 2
                self.program.append((op,))
                rank = 2

    def _lin(self, rng: random.Random, k: int, n: int) -> int:
        self.lins.append(torch.nn.Linear(k, n, bias=rng.random() < 0.6))
        return len(self.lins) - 1

    def forward(self, h):
        for step in self.program:
            op = step[0]
            if op == "linear":
                h = self.lins[step[1]](h)
            elif op == "glu":
                h = torch.nn.functional.silu(self.lins[step[1]](h)) * self.lins[step[2]](h)
            elif op == "act":
                h = getattr(torch, step[1])(h)
            elif op == "scale":
                h = h * step[1] + step[2]
            elif op == "tail":
                h = h[..., -step[1] :]
            elif op == "cat":
                h = torch.cat([h, self.lins[step[1]](h)], dim=-1)
            elif op == "residual":
                h = h + self.lins[step[1]](h)
            elif op == "last":
                h = h[:, -1]
            else:
                h = h[:, -2]
        return h


class FuzzModule(torch.nn.Module):
    """Several random graphs over three inputs; outputs as a tuple, a dict or nested."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.which = [i % len(INPUTS) for i in range(GRAPHS_PER_MODULE)]  # every input used
        rng.shuffle(self.which)
        self.graphs = torch.nn.ModuleList(RandomGraph(rng, INPUTS[i][1]).to(INPUTS[i][0]) for i in self.which)
        self.style = rng.choice(["tuple", "dict", "nested"])

    def forward(self, x32, x16, xbf):
        xs = (x32, x16, xbf)
        outs = [g(xs[i]) for g, i in zip(self.graphs, self.which, strict=True)]
        if self.style == "tuple":
            return tuple(outs)
        if self.style == "dict":
            return {f"g{i}": o for i, o in enumerate(outs)}
        return {"first": outs[0], "rest": (outs[1:4], {"tail": outs[4:]})}


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [leaf for v in out.values() for leaf in _leaves(v)]
    return [leaf for v in out for leaf in _leaves(v)]


@pytest.mark.parametrize("module", range(MODULES))
def test_random_graphs_match_torch(module):
    rng = random.Random(SEED * 1000 + module)
    torch.manual_seed(SEED * 1000 + module)
    model = FuzzModule(rng).eval()
    example = tuple(torch.randn(*shape).to(dtype) for dtype, shape in INPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = pbtvm.compile(model, example, bits=16, act_bits=16)
    xs = tuple(torch.randn(2, *shape[1:]).to(dtype) for dtype, shape in INPUTS)  # another batch size
    with torch.no_grad():
        want = model(*xs)
    got = compiled(*xs)
    assert type(got) is type(want) and (not isinstance(want, dict) or list(got) == list(want))
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    assert len(got_leaves) == len(want_leaves) == GRAPHS_PER_MODULE
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        program = model.graphs[i].program
        assert g.dtype == w.dtype and g.shape == w.shape, (i, program)
        tol = TOLERANCE[w.dtype] * max(float(w.double().abs().max()), 1e-2)
        err = float((g.double() - w.double()).abs().max())
        assert err <= tol, f"graph {i} {program}: max error {err:.3g} > {tol:.3g}"
