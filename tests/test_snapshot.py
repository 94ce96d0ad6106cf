"""What a compiled or exported model holds stays as it was compiled (a newcomer's findings, the
twenty-fifth session): the torch model's full-precision tensors are copied, not shared; an
output that is memory the model keeps (a constant, a staged input, seen through views) is handed
out as a copy; a library whose machine code was changed after export is refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pbtvm
from pbtvm import library
from pbtvm._tvm import relax, tvm
from pbtvm.relay_passes import OwnConstants, outputs_to_copy


def _compile(model, *example, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pbtvm.compile(model.eval(), example, **{"bits": 8, **kw})


class NormAndBuffer(torch.nn.Module):
    """A PB layer between ops that stay in full precision (LayerNorm, an added buffer), and a
    buffer returned as an output."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(12)
        self.fc = torch.nn.Linear(12, 6)
        self.register_buffer("shift", torch.arange(6.0))

    def forward(self, x):
        return self.fc(self.norm(x)) + self.shift, self.shift.clone()


def test_the_compiled_model_does_not_follow_later_changes_of_the_torch_model(tmp_path):
    torch.manual_seed(0)
    model = NormAndBuffer().eval()
    x = torch.randn(3, 12)
    compiled = _compile(model, x)
    before = [t.clone() for t in compiled(x)]
    with torch.no_grad():  # training after compile, or an edit: none of it reaches the compiled model
        model.norm.weight.mul_(3)
        model.norm.bias.add_(1)
        model.shift.add_(100)
        model.fc.weight.mul_(2)
    after = compiled(x)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    path = compiled.export(tmp_path / "m.so")  # exports the model as compiled, too
    assert all(torch.equal(a, b) for a, b in zip(pbtvm.load(path)(x), before, strict=True))


def test_an_output_that_is_a_constant_is_a_copy():
    torch.manual_seed(0)
    model = NormAndBuffer().eval()
    x = torch.randn(3, 12)
    compiled = _compile(model, x)
    assert compiled.manifest["copied_outputs"] == [1]
    _, shift = compiled(x)
    shift.add_(100)  # the caller's tensor: neither the model's buffer nor later results change
    assert torch.equal(compiled(x)[1], torch.arange(6.0)) and torch.equal(model.shift, torch.arange(6.0))
    y = compiled(x.numpy())[1]  # numpy outputs are copies anyway
    y += 1
    assert np.array_equal(compiled(x.numpy())[1], np.arange(6.0, dtype=np.float32))


class Views(torch.nn.Module):
    """Outputs the VM hands back as memory it keeps: a buffer through ops TVM turns into views, a
    value computed from buffers alone, and a view of the input (staged when unaligned)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("row", torch.arange(4.0).reshape(1, 4))

    def forward(self, x):
        return (
            self.fc(x),
            self.row.unsqueeze(0),
            self.row.squeeze(0),
            self.row.permute(1, 0),
            self.row * 2,
            x.unsqueeze(0),
        )


def test_outputs_the_model_keeps_are_copies():
    torch.manual_seed(0)
    model = Views().eval()
    compiled = _compile(model, torch.randn(4, 4))
    assert compiled.manifest["copied_outputs"] == [1, 2, 3, 4, 5]
    unaligned = torch.randn(17)[1:].reshape(4, 4)  # 4 bytes past an aligned start: staged
    first = compiled(unaligned)
    kept = [t.clone() for t in first]
    for t in first[1:5]:
        t.add_(1000)  # the caller's copies: later calls and the model's buffer do not see it
    second = compiled(torch.randn(17)[1:].reshape(4, 4))  # staged into the same buffer
    assert torch.equal(first[5], kept[5])  # the first call's view of its input is not overwritten
    assert all(torch.equal(a, b) for a, b in zip(second[1:5], kept[1:5], strict=True))
    assert torch.equal(model.row, torch.arange(4.0).reshape(1, 4))


def test_outputs_to_copy_reads_the_function():
    x = relax.Var("x", relax.TensorType([2, 3], "float32"))
    table = relax.const(np.zeros((2, 3), np.float32))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            kept = bb.emit(table)
            view = bb.emit(relax.op.reshape(kept, (3, 2)))
            computed = bb.emit(relax.op.add(x, table))
            folded = bb.emit(relax.op.multiply(table, table))
            seen = bb.emit(relax.op.expand_dims(x, 0))
            out = bb.emit_output(relax.Tuple([computed, view, x, kept, folded, seen]))
        bb.emit_func_output(out)
    assert outputs_to_copy(bb.get()["main"]) == [1, 2, 3, 4, 5]


def test_own_constants_copies_each_shared_tensor_once():
    """Two constants on one torch tensor (a tied weight) stay one copy; the copy is not the tensor."""
    weight = torch.randn(4, 3)
    shared = tvm.runtime.from_dlpack(weight)
    x = relax.Var("x", relax.TensorType([2, 3], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        a = bb.emit(relax.op.matmul(x, relax.op.permute_dims(relax.const(shared))))
        b = bb.emit(relax.op.matmul(x, relax.op.permute_dims(relax.const(tvm.runtime.from_dlpack(weight)))))
        bb.emit_func_output(relax.Tuple([a, b]))
    own = OwnConstants()
    mod = own(bb.get())
    assert own.copied == 1
    consts = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: consts.append(e) if isinstance(e, tvm.ir.GenericConst) else None
    )
    assert len({c.value.data_ptr() for c in consts}) == 1 and consts[0].value.data_ptr() != weight.data_ptr()
    weight.mul_(2)
    assert np.array_equal(consts[0].value.numpy() * 2, weight.numpy())


def _section(path, name: str) -> library.ElfSection:
    data = open(path, "rb").read()
    return next(s for s in library.elf_sections(data, str(path)) if s.name == name)


def test_a_library_whose_code_was_changed_refuses_to_load(tmp_path):
    torch.manual_seed(0)
    compiled = _compile(torch.nn.Linear(16, 8), torch.randn(2, 16))
    path = compiled.export(tmp_path / "m.so")
    assert pbtvm.load(path) and library.read_elf_section(str(path), library.CODE_SECTION).startswith(b"sha256:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.so"]  # linked beside it, then moved over it
    data = open(path, "rb").read()
    text, rodata = _section(path, ".text"), _section(path, ".rodata")
    for at in (text.offset + 7, text.offset + text.size // 2, rodata.offset + 3):  # one flipped byte
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        bad = tmp_path / f"bad{at}.so"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(library.LibraryError, match="code or constants were changed"):
            pbtvm.load(bad)
    codesum = _section(path, library.CODE_SECTION)
    unsealed = bytearray(data)  # as an export cut short between linking and sealing would leave it
    unsealed[codesum.offset : codesum.offset + len(library._UNSEALED)] = library._UNSEALED.encode()
    (tmp_path / "unsealed.so").write_bytes(bytes(unsealed))
    with pytest.raises(library.LibraryError, match="its export did not finish"):
        pbtvm.load(tmp_path / "unsealed.so")


def test_the_manifest_checksum_is_the_one_older_versions_compute(tmp_path):
    """The code checksum lives in its own section: the manifest (and its checksum over the manifest
    and the devbin) is what a pbtvm before it wrote and checks, and a library without the section
    (exported before it) is checked as before."""
    torch.manual_seed(0)
    path = _compile(torch.nn.Linear(16, 8), torch.randn(2, 16)).export(tmp_path / "m.so")
    manifest = library.read_manifest(str(path))
    older = {k: v for k, v in manifest.items() if k != "checksum"}
    devbin = library.read_elf_section(str(path), library.DEVBIN_SECTION)
    assert "code_checksum" not in manifest and library.checksum(older, devbin) == manifest["checksum"]
    renamed = bytearray(open(path, "rb").read())  # the section renamed away: an older export's file
    at = renamed.find(library.CODE_SECTION.encode() + b"\0")
    renamed[at : at + len(library.CODE_SECTION)] = b".pbtvm_xxxxxxx"
    (tmp_path / "older.so").write_bytes(bytes(renamed))
    assert pbtvm.load(tmp_path / "older.so")
