"""Exported libraries as files (from an adversarial run of the CLI): a library exported again over a
path this process loaded, names without ``.so``, paths that are not regular files, linker failures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pbtvm
from pbtvm import library
from pbtvm.errors import InputError


def _model(seed: int, width: int = 32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8)).eval()
    return pbtvm.compile(model, (torch.randn(2, width),), bits=4)


def test_a_library_exported_again_over_a_loaded_path_loads_anew(tmp_path):
    """dlopen hands back the library it opened under a name: the second load ran the first model's
    code (same outputs), even under another width, with the new manifest."""
    path = tmp_path / "model.so"
    first, second, wider = _model(0), _model(1), _model(2, width=40)
    x = torch.randn(3, 32)
    first.export(path)
    kept = pbtvm.load(path)
    assert torch.equal(kept(x), first(x))
    second.export(path)
    assert torch.equal(pbtvm.load(path)(x), second(x))
    assert torch.equal(kept(x), first(x))  # the first load is untouched
    wider.export(path)
    x40 = torch.randn(3, 40)
    assert torch.equal(pbtvm.load(path)(x40), wider(x40))
    assert torch.equal(pbtvm.load(path)(x40), wider(x40))  # an unchanged file again: no copy needed, same answer


def test_any_file_name_loads(tmp_path):
    """TVM picks its loader by the extension: model.bin or a name without one could not be loaded."""
    model, x = _model(3), torch.randn(2, 32)
    for name in ("model.bin", "model"):
        model.export(tmp_path / name)
        assert torch.equal(pbtvm.load(tmp_path / name)(x), model(x))


def test_export_refuses_paths_that_are_not_regular_files(tmp_path):
    """os.replace turned /dev/null (and any FIFO or device node) into the library."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="it is not a regular file"):
        _model(4).export(fifo)
    assert fifo.is_fifo()


def test_linker_failures_name_the_linker_s_reason():
    message = textwrap.dedent(
        """\
        Compilation error:
        /tmp/x/pbtvm_manifest.c:5:47: warning: 'used' attribute ignored [-Wattributes]
        /usr/bin/ld: final link failed: No space left on device
        collect2: error: ld returned 1 exit status

        Command line: /usr/bin/g++ -shared -fPIC -o /out/.a.so.tmp.so /tmp/x/lib0.o"""
    )
    assert library._toolchain_reason(message) == "/usr/bin/ld: final link failed: No space left on device"
    assert library._toolchain_reason("some other failure") is None
    broken = "Compilation error:\n/tmp/x/m.c:3:1: error: expected ';'\n/usr/bin/ld: lib0.o: undefined reference to `f'"
    assert library._toolchain_reason(broken) is None  # pbtvm's bug, not the file system's: reported as such
    assert issubclass(library.ExportError, OSError)
    oom = "Compilation error:\ng++: fatal error: Killed signal terminated program cc1plus\ncompilation terminated."
    assert library._toolchain_reason(oom) == "g++: fatal error: Killed signal terminated program cc1plus"
    assert library._toolchain_reason("Compilation error:\ncc1plus: out of memory\nvirtual memory exhausted: x") == (
        "virtual memory exhausted: x"
    )


def _fake_statvfs(monkeypatch, **fields):
    """``os.statvfs`` as the library sees it, with ``fields`` computed from the real result."""
    real = os.statvfs

    class Fake:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, name):
            return fields[name](self.st) if name in fields else getattr(self.st, name)

    monkeypatch.setattr(library.os, "statvfs", lambda p: Fake(real(p)))


def test_a_nearly_full_temp_dir_is_refused_before_llvm_ends_the_process(tmp_path, monkeypatch):
    """LLVM writes the kernels' object file to the temp dir and calls exit(1) when it cannot (the
    process ended with "LLVM ERROR: IO failure on output stream", its pbtvm_export_* dir left)."""
    model = _model(5)
    _fake_statvfs(monkeypatch, f_bavail=lambda st: (5 << 20) // st.f_frsize)
    monkeypatch.setattr(library.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(library.ExportError, match=r"only 5\.0 MiB free in .*needs at least 32 MiB.*TMPDIR"):
        model.export(tmp_path / "model.so")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_writing_the_intermediate_files_is_an_export_error(tmp_path, monkeypatch):
    """The weights' blob is written in Python: a full disk there was an OSError the CLI called a bug."""
    import errno

    model = _model(6)

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(library, "serialize_blob", full)
    monkeypatch.setattr(library.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(library.ExportError, match=r"No space left on device while writing its intermediate files"):
        model.export(tmp_path / "model.so")
    assert os.listdir(tmp_path) == []  # neither the temp dir nor a half-linked library left


def test_cli_finds_model_modules_in_the_working_directory(tmp_path):
    """``pbtvm compile models:factory`` in the folder holding models.py (as ``python -m`` would)."""
    (tmp_path / "my_models.py").write_text(
        "import torch\n\ndef small():\n    return torch.nn.Linear(16, 4), (torch.randn(2, 16),)\n"
    )
    # no working directory on sys.path, as in the console script; after loading, none again
    code = (
        "import sys; sys.path.remove(''); from pbtvm.cli import main; status = main(sys.argv[1:]); "
        "assert '' not in sys.path and not any(p.endswith('" + tmp_path.name + "') for p in sys.path); sys.exit(status)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "compile", "my_models:small", "-o", "small.so"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "small.so").is_file()


@pytest.mark.parametrize("counts_inodes", [True, False])
def test_a_temp_dir_without_free_inodes_is_refused(tmp_path, monkeypatch, counts_inodes):
    """Out of inodes: refused. btrfs and vfat count none (f_files, f_favail 0): not refused."""
    model = _model(7)
    _fake_statvfs(monkeypatch, f_favail=lambda _st: 0, f_files=lambda st: st.f_files if counts_inodes else 0)
    monkeypatch.setattr(library.tempfile, "tempdir", str(tmp_path))
    if counts_inodes:
        with pytest.raises(library.ExportError, match=r"no file can be created in .* \(no free inodes\)"):
            model.export(tmp_path / "model.so")
        assert os.listdir(tmp_path) == []
    else:
        model.export(tmp_path / "model.so")
        assert os.listdir(tmp_path) == ["model.so"]


def test_the_blob_is_assembled_from_a_file_in_a_temp_dir_of_any_name(tmp_path, monkeypatch):
    """The module blob (weights included) went through the C compiler as a decimal array: ~150 bytes
    of compiler memory per byte (a 40 MB blob needed 6.4 GB and 55 s; GPT-2's fp32 embedding could
    not be exported on a 23 GB machine). The assembler's ``.incbin`` reads it from the temp dir, whose
    path (quotes, backslash, spaces) is quoted for the assembler."""
    model, x = _model(7), torch.randn(2, 32)
    tmp = tmp_path / 'odd "dir" \\ name'
    tmp.mkdir()
    monkeypatch.setattr(library.tempfile, "tempdir", str(tmp))
    sources = []
    real = library._incbin_asm

    def recording(*args):
        sources.append(real(*args))
        return sources[-1]

    monkeypatch.setattr(library, "_incbin_asm", recording)
    model.export(tmp_path / "model.so")
    assert len(sources) == 1 and ".incbin" in sources[0]
    assert torch.equal(pbtvm.load(tmp_path / "model.so")(x), model(x))
    assert os.listdir(tmp) == []
