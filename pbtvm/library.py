"""The deployable .so: TVM's module blob plus a pbtvm manifest, both in named ELF sections.

Layout of an exported library (Linux ELF):

* ``.pbtvm_manifest``: the manifest JSON (format version, bits, target, TVM version, layers),
  readable without loading the library (``pbtvm inspect``, and the checks :func:`pbtvm.load`
  makes before it hands the file to TVM).
* ``.pbtvm_devbin``: the symbol ``__tvm_ffi__library_bin`` that TVM's loader reads: the
  serialized import tree (VM bytecode with the packed weights, device modules). Any CUDA module
  that still holds CUDA source is replaced by an nvcc-built fatbin here, so loading needs no
  compiler.
* ``.pbtvm_codesum``: a SHA-256 over the other allocated sections (:func:`code_checksum`: the CPU
  kernels' machine code, their constants), written into the linked file before it is moved to
  its name.

The manifest's ``checksum`` is a SHA-256 over the rest of the manifest and the devbin blob;
:func:`verify_checksum` (run by :func:`pbtvm.load`) refuses a library whose manifest was edited
(e.g. to claim other bits), whose weights were changed, or whose code was (a corrupt copy would
otherwise load and compute garbage, or crash). Libraries exported before ``.pbtvm_codesum``
existed have no such section and are checked as before; older pbtvm versions ignore it.

TVM's blob format (tvm-ffi ``SerializeModuleToBytes``): ``u64 nbytes``, then a u64-vector of
import-tree row pointers, a u64-vector of child indices, then per module a string ``kind`` and,
unless the kind is ``_lib``, a byte string payload. Strings are ``u64 length`` + bytes. A CUDA
payload is ``fmt`` string, function table, code bytes (code last).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import tvm_ffi

from .cuda import compile_fatbin

MANIFEST_SECTION = ".pbtvm_manifest"
DEVBIN_SECTION = ".pbtvm_devbin"
#: Section holding :func:`code_checksum` of the linked library (written into it after linking).
CODE_SECTION = ".pbtvm_codesum"
BLOB_SYMBOL = "__tvm_ffi__library_bin"


class LibraryError(ValueError):
    """A file is not a (valid) pbtvm library."""


class ExportError(OSError):
    """The library could not be written: the compiler or linker failed on the output (a full disk, a
    file system that refuses it) or ran out of memory; the message holds their reason."""


# ====================================================================== ELF
#: ``sh_flags`` bit of sections the loader maps into memory; ``sh_type`` of those without file data.
SHF_ALLOC = 0x2
SHT_NOBITS = 8


@dataclass
class ElfSection:
    """One section header of an ELF64 file."""

    name: str
    kind: int  # sh_type
    flags: int  # sh_flags
    offset: int
    size: int


def elf_sections(data: bytes, path: str) -> list[ElfSection]:
    """Section headers of the little-endian ELF64 file whose bytes are ``data``.

    Raises
    ------
    LibraryError
        If the file is not a little-endian ELF64 object, its headers are corrupt, or a section
        runs past the end of the file (a truncated copy).
    """
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise LibraryError(f"{path} is not an ELF shared library")
    if data[4] != 2 or data[5] != 1:
        raise LibraryError(f"{path}: only little-endian ELF64 libraries are supported")
    try:
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
        *_, str_off, str_size = headers[shstrndx]
        strtab = data[str_off : str_off + str_size]
        sections = []
        for sh_name, sh_type, sh_flags, _, sh_offset, sh_size in headers:
            name = strtab[sh_name : strtab.index(b"\0", sh_name)].decode()
            if sh_type != SHT_NOBITS and sh_offset + sh_size > len(data):
                raise LibraryError(f"{path}: section {name} runs past the end of the file (truncated?)")
            sections.append(ElfSection(name, sh_type, sh_flags, sh_offset, sh_size))
        return sections
    except (struct.error, IndexError, ValueError) as err:
        if isinstance(err, LibraryError):
            raise
        raise LibraryError(f"{path}: corrupt ELF headers ({err})") from err


def read_elf_section(path: str, name: str, data: bytes | None = None) -> bytes | None:
    """Bytes of section ``name`` in the ELF64 file ``path`` (``data``: its bytes, if already
    read), or None if it has no such section.

    Raises
    ------
    LibraryError
        As :func:`elf_sections`.
    """
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    for section in elf_sections(data, path):
        if section.name == name:
            return data[section.offset : section.offset + section.size]
    return None


# ====================================================================== TVM blob
@dataclass
class BlobModule:
    """One module of the serialized import tree."""

    kind: str
    payload: bytes | None  # None for "_lib" (the DSO itself)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise LibraryError("TVM module blob is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def vec(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise LibraryError("TVM module blob is truncated")
        self.pos += n


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _raw(b: bytes) -> bytes:
    return _u64(len(b)) + b


def parse_blob(blob: bytes) -> tuple[list[int], list[int], list[BlobModule]]:
    """Split a packed import blob (with its u64 size header) into tree and modules."""
    r = _Reader(blob)
    try:
        total = r.u64()
        if total + 8 != len(blob):
            raise LibraryError(f"TVM module blob says {total} bytes but holds {len(blob) - 8}")
        row_ptr, children = r.vec(), r.vec()
        modules = []
        for _ in range(max(len(row_ptr) - 1, 0)):
            kind = r.raw().decode()
            modules.append(BlobModule(kind, None if kind == "_lib" else r.raw()))
    except struct.error as err:
        raise LibraryError("TVM module blob is truncated") from err
    return row_ptr, children, modules


def serialize_blob(row_ptr: list[int], children: list[int], modules: list[BlobModule]) -> bytes:
    """Inverse of :func:`parse_blob`."""
    body = _u64(len(row_ptr)) + b"".join(map(_u64, row_ptr)) + _u64(len(children)) + b"".join(map(_u64, children))
    for m in modules:
        body += _raw(m.kind.encode()) + (b"" if m.payload is None else _raw(m.payload))
    return _u64(len(body)) + body


def cuda_payload_format(payload: bytes) -> str:
    """The ``fmt`` of a CUDA module payload: ``cuda`` (source), ``ptx``, ``cubin`` or ``fatbin``."""
    return _Reader(payload).raw().decode()


def cuda_payload_code(payload: bytes) -> bytes:
    """The code bytes (last field) of a CUDA payload, found by its length prefix."""
    head = 8 + len(cuda_payload_format(payload))
    for pos in range(head, len(payload) - 7):  # first match = the longest tail = the code
        if struct.unpack_from("<Q", payload, pos)[0] == len(payload) - pos - 8:
            return payload[pos + 8 :]
    raise LibraryError("cannot find the code in a CUDA module payload")


def _source_to_fatbin(payload: bytes, sources: list[str], arch: str) -> bytes:
    fmt = cuda_payload_format(payload)
    if fmt in ("cubin", "fatbin"):
        return payload
    if fmt != "cuda":
        raise LibraryError(f"CUDA module in format {fmt!r}: pbtvm exports only compiled cubin/fatbin")
    head = 8 + len(fmt)
    for src in sources:
        tail = _raw(src.encode())
        if payload.endswith(tail):
            fmap = payload[head : len(payload) - len(tail)]
            return _raw(b"fatbin") + fmap + _raw(compile_fatbin(src, arch))
    raise LibraryError("CUDA source in the module blob does not match any CUDA module's source")


def _cuda_sources(mod: Any) -> list[str]:
    out, stack, seen = [], [mod], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "cuda":
            out.append(str(m.inspect_source("cuda")) or str(m.inspect_source()))
        stack.extend(m.imports)
    return out


def compiled_imports_blob(mod: Any, cuda_arch: str | None) -> bytes:
    """TVM's serialized import tree of ``mod`` (what its loader reads at :data:`BLOB_SYMBOL`), with
    every CUDA module that holds source (TVM keeps source on a host without a CUDA driver)
    replaced by an nvcc-built fatbin for ``cuda_arch`` (:func:`pbtvm.cuda.compile_fatbin`).

    Raises
    ------
    LibraryError
        If ``mod`` has CUDA kernels and ``cuda_arch`` is None.
    """
    pack = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")
    with without_scope_warnings():  # TVM logs a line per weight as it serializes the constants
        row_ptr, children, modules = parse_blob(bytes(pack(mod).numpy()))
    sources = None
    for m in modules:
        if m.kind == "cuda":
            if cuda_arch is None:
                raise LibraryError("the module has CUDA kernels but no CUDA arch was given")
            sources = sources if sources is not None else _cuda_sources(mod)
            m.payload = _source_to_fatbin(m.payload, sources, cuda_arch)
    return serialize_blob(row_ptr, children, modules)


def pack_compiled_imports_c(cuda_arch: str) -> Callable[[Any, bool, str, str], str]:
    """An ``fpack_imports`` for ``Module.export_library`` that writes the imports as C source
    (:func:`compiled_imports_blob` in a byte array): CUDA kernels leave as fatbins built as
    ``compile`` builds them, not as source the loading host compiles with its own NVRTC.

    For small modules (a tuning candidate: no weights): the array is C text, which ``tar``
    exports carry to the host that links them; :func:`export_library` includes large blobs by
    ``.incbin`` instead.
    """

    def fpack_imports(mod: Any, is_system_lib: bool, prefix: str, workspace: str) -> str:
        if is_system_lib or prefix:
            raise ValueError("pbtvm packs the imports of shared libraries, not of system libs")
        out = os.path.join(workspace, "pbtvm_devc.c")
        with open(out, "w") as f:
            f.write(_c_array(BLOB_SYMBOL, DEVBIN_SECTION, compiled_imports_blob(mod, cuda_arch)))
        return out

    return fpack_imports


def _incbin_asm(name: str, section: str, data_path: str, size: int) -> str:
    """Assembly (GNU as, any ELF target) defining the exported byte array ``name`` of ``size``
    bytes in its own ELF section, read from the file ``data_path`` by ``.incbin``.

    For the module blob (weights included): as a C array (:func:`_c_array`) the compiler took about
    150 bytes of memory and 1.5 s per MB of blob, so a model with a 40 MB blob needed 6.4 GB to
    export and one with a fp32 GPT-2 embedding table could not be exported on a 23 GB machine;
    ``.incbin`` copies the bytes (200 MB in under 2 s)."""
    quoted = data_path.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'\t.section {section},"a",%progbits\n'
        "\t.balign 8\n"
        f"\t.globl {name}\n"
        f"\t.type {name}, %object\n"
        f"\t.size {name}, {size}\n"
        f"{name}:\n"
        f'\t.incbin "{quoted}"\n'
        '\t.section .note.GNU-stack,"",%progbits\n'  # no executable stack
    )


def _c_array(name: str, section: str, data: bytes) -> str:
    """C/C++ source defining an exported, unmangled byte array in its own ELF section."""
    body = ",".join(str(b) for b in data)
    return (
        '#ifdef __cplusplus\nextern "C" {\n#endif\n'
        f'__attribute__((section("{section}"), used, aligned(8), visibility("default")))\n'
        f"extern const unsigned char {name}[{len(data)}];\n"
        f"const unsigned char {name}[{len(data)}] = {{{body}}};\n"
        "#ifdef __cplusplus\n}\n#endif\n"
    )


#: What TVM logs for each weight when an executable a VM has run is saved (the run gave the
#: constants a memory scope), and for each such weight when the library is loaded. Nothing is
#: wrong: the reloaded model gives bit-identical results (tests/test_quiet.py, tutorial 03).
_SCOPE_LINES = (b"Warning: Scope Saving:", b"Warning: Scope Loaded:")


_STDERR_LOCK = threading.Lock()  # one redirect of fd 2 at a time (an export and a load in two threads)


@contextlib.contextmanager
def without_scope_warnings() -> Iterator[None]:
    """Drop TVM's ``Scope Saving`` / ``Scope Loaded`` lines from the process's stderr (fd 2).

    A model exported after it was called printed one such line per weight tensor at export and
    again at every load. Every other line written to fd 2 meanwhile
    is passed on unchanged when the block ends (a process ending inside the block loses them: the
    export wraps only the serializing of the constants, not the compiler and linker). Without a
    usable fd 2 nothing is filtered.
    """
    with _STDERR_LOCK:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                caught.seek(0)
                kept = [
                    line for line in caught.read().splitlines(keepends=True) if not any(m in line for m in _SCOPE_LINES)
                ]
                if kept:
                    os.write(2, b"".join(kept))


def export_library(executable: Any, path: str, manifest: dict, cuda_arch: str | None) -> None:
    """Write ``executable`` (a ``tvm.runtime.Executable``) as one .so with the manifest inside.

    Parameters
    ----------
    executable : tvm.runtime.Executable
    path : str
        Output path of the shared library.
    manifest : dict
        JSON-serialisable manifest, stored in ``.pbtvm_manifest``.
    cuda_arch : str or None
        ``sm_XY`` to compile any remaining CUDA source for; None for CPU modules.
    """
    manifest_c = None

    def fpack_imports(mod: Any, is_system_lib: bool, prefix: str, workspace: str) -> str:
        if is_system_lib or prefix:
            raise ValueError("pbtvm exports are shared libraries, not system libs")
        blob = compiled_imports_blob(mod, cuda_arch)
        data = os.path.join(workspace, "pbtvm_devbin.bin")
        with open(data, "wb") as f:
            f.write(blob)
        out = os.path.join(workspace, "pbtvm_devc.s")
        with open(out, "w") as f:
            f.write(_incbin_asm(BLOB_SYMBOL, DEVBIN_SECTION, data, len(blob)))
        # TVM packs the imports before it compiles the addons: the manifest can hash the blob.
        signed = {**manifest, "checksum": checksum(manifest, blob)}
        with open(manifest_c, "w") as f:
            f.write(_c_array("pbtvm_manifest", MANIFEST_SECTION, json.dumps(signed, sort_keys=True).encode() + b"\0"))
            f.write(_c_array("pbtvm_codesum", CODE_SECTION, _UNSEALED.encode() + b"\0"))
        return out

    # Linked beside ``path`` under a name of its own, sealed, then moved over ``path`` in one step:
    # no reader (or concurrent export) ever sees an unsealed or half-written library there.
    folder, name = os.path.split(os.path.abspath(path))
    linked = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.so")
    _check_room(tempfile.gettempdir(), path)
    try:
        try:
            with tempfile.TemporaryDirectory(prefix="pbtvm_export_") as tmp:
                manifest_c = os.path.join(tmp, "pbtvm_manifest.c")
                try:
                    executable.mod.export_library(
                        linked, fpack_imports=fpack_imports, addons=[manifest_c], workspace_dir=tmp
                    )
                except RuntimeError as err:
                    reason = _toolchain_reason(str(err))
                    if reason is None:
                        raise
                    raise ExportError(f"cannot write {path}: {reason}") from err
        except OSError as err:
            if err.errno not in _FULL_OR_REFUSED:
                raise
            raise ExportError(
                f"cannot write {path}: {err.strerror} while writing its intermediate files in "
                f"{tempfile.gettempdir()} (free space there, or point TMPDIR to a file system with room)"
            ) from err
        _seal_code(linked)
        os.replace(linked, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(linked)


#: Free bytes the export's temporary directory must have. LLVM writes the kernels' object file
#: there and ends the process (``exit(1)``, "LLVM ERROR: IO failure on output stream") when it
#: cannot: no exception to catch, so a nearly full file system is refused before.
MIN_FREE_BYTES = 32 << 20
#: ``errno`` of a write the file system refused: full, over quota, read-only, file too large.
_FULL_OR_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _check_room(tmp: str, path: str) -> None:
    """Raise :class:`ExportError` if ``tmp`` has less than :data:`MIN_FREE_BYTES` free."""
    try:
        st = os.statvfs(tmp)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize  # what shutil.disk_usage reports as free
    if st.f_files > 0 and st.f_favail == 0:  # btrfs, vfat count no inodes: all three fields 0
        raise ExportError(
            f"cannot write {path}: no file can be created in {tmp} (no free inodes): point TMPDIR elsewhere"
        )
    if free < MIN_FREE_BYTES:
        raise ExportError(
            f"cannot write {path}: only {free / 2**20:.1f} MiB free in {tmp}, where the export "
            f"writes its intermediate files (it needs at least {MIN_FREE_BYTES >> 20} MiB there): free space, "
            "or point TMPDIR to a file system with room"
        )


#: What a linker or compiler says when it cannot write its output (the file system's fault, not pbtvm's).
_OUTPUT_FAILURES = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
    "File too large",
    "cannot open output file",
    # out of memory: the compiler's or assembler's own words, and the driver's when the kernel killed it
    "virtual memory exhausted",
    "Cannot allocate memory",
    "Killed signal terminated program",
)


def _toolchain_reason(message: str) -> str | None:
    """The linker's or compiler's line in TVM's ``Compilation error`` message saying it could not
    write its output (``ld: final link failed: No space left on device``) or ran out of memory
    (``g++: fatal error: Killed signal terminated program cc1plus``); None for any other
    error (a compile or link error is pbtvm's bug, reported as such)."""
    if not message.startswith("Compilation error"):
        return None
    lines = [line.strip() for line in message.split("Command line:", 1)[0].splitlines()]
    failures = [line for line in lines if any(reason in line for reason in _OUTPUT_FAILURES)]
    return "; ".join(failures[:3]) or None


def checksum(manifest: dict, blob: bytes) -> str:
    """``sha256:<hex>`` over the manifest (without its ``checksum`` entry) and the devbin blob."""
    h = hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "checksum"}, sort_keys=True).encode())
    h.update(blob)
    return "sha256:" + h.hexdigest()


#: :data:`CODE_SECTION`'s content until the library is sealed: as long as a real checksum.
_UNSEALED = "sha256:" + "0" * 64
#: Sections :func:`code_checksum` leaves out: its own, and those the manifest's checksum covers.
_NOT_CODE = (MANIFEST_SECTION, DEVBIN_SECTION, CODE_SECTION)


def code_checksum(data: bytes, path: str) -> str:
    """``sha256:<hex>`` over every allocated section with file data of the ELF file ``data`` (the
    CPU kernels' machine code, their constants, the dynamic linking tables), each with its name,
    except :data:`_NOT_CODE`."""
    h = hashlib.sha256()
    for section in elf_sections(data, path):
        if section.flags & SHF_ALLOC and section.kind != SHT_NOBITS and section.name not in _NOT_CODE:
            h.update(section.name.encode() + b"\0")
            h.update(data[section.offset : section.offset + section.size])
    return "sha256:" + h.hexdigest()


def _seal_code(path: str) -> None:
    """Write the linked library's :func:`code_checksum` over the placeholder in :data:`CODE_SECTION`."""
    with open(path, "rb") as f:
        data = f.read()
    (section,) = [s for s in elf_sections(data, path) if s.name == CODE_SECTION]
    if not data[section.offset : section.offset + section.size].startswith(_UNSEALED.encode()):
        raise RuntimeError(f"{path}: no code checksum placeholder in {CODE_SECTION}")
    sealed = code_checksum(data, path).encode()
    with open(path, "r+b") as f:
        f.seek(section.offset)
        f.write(sealed)


def verify_checksum(path: str, manifest: dict, data: bytes | None = None) -> None:
    """Raise :class:`LibraryError` unless the manifest's checksum matches the manifest and blob.

    A library whose manifest was edited (say, to claim other bits) would otherwise load and
    compute garbage; one without a checksum was not written by :func:`export_library`.
    """
    want = manifest.get("checksum")
    if not want:
        raise LibraryError(f"{path}: the pbtvm manifest has no checksum (not written by pbtvm export): re-export it")
    if data is None:  # else the file's bytes, as the caller read them once (:func:`read_library`)
        with open(path, "rb") as f:
            data = f.read()
    sections = {s.name: s for s in elf_sections(data, path)}
    if DEVBIN_SECTION not in sections:
        raise LibraryError(f"{path} has no {DEVBIN_SECTION} section: not a pbtvm library")
    devbin = sections[DEVBIN_SECTION]
    if checksum(manifest, data[devbin.offset : devbin.offset + devbin.size]) != want:
        raise LibraryError(
            f"{path}: checksum mismatch: the manifest or the weights were changed after export; re-export the model"
        )
    if CODE_SECTION not in sections:  # exported before the code checksum existed
        return
    code = sections[CODE_SECTION]
    code = data[code.offset : code.offset + code.size].rstrip(b"\0").decode(errors="replace")
    if code == _UNSEALED:
        raise LibraryError(f"{path}: its export did not finish (the library was never sealed); export it again")
    if code_checksum(data, path) != code:
        raise LibraryError(
            f"{path}: checksum mismatch: the library's code or constants were changed after export (a corrupt "
            "copy?); copy it again or re-export the model"
        )


#: (device, inode, size, mtime, manifest checksum) of the library first handed to dlopen under each
#: real path, by this process.
_DLOPENED: dict[str, tuple] = {}
_DLOPENED_LOCK = threading.Lock()


@contextlib.contextmanager
def dlopen_name(path: str, data: bytes, read_stat: os.stat_result, signed: str) -> Iterator[str]:
    """The file name to hand TVM's loader (``dlopen``) for the library ``path``.

    ``path`` itself, unless ``dlopen`` would not read what was verified: it returns the library it
    already opened under a name, whatever the file holds now (a model exported again over a path
    this process had loaded ran the old code under the new manifest), TVM's loader picks the
    loader by the name's extension (``model.bin`` could not be loaded), and the file may have
    changed since it was read. In those cases a private copy of ``data``, named ``*.so``, beside
    the library (else in the temporary directory), removed after the load (the mapping stays).

    Parameters
    ----------
    path : str
        The library file.
    data : bytes
        Its bytes as read and verified (:func:`read_library`, :func:`verify_checksum`).
    read_stat : os.stat_result
        ``os.stat(path)`` taken just before ``data`` was read.
    signed : str
        The manifest's verified checksum (over the manifest, weights and device code): what tells
        two libraries apart where the file system's identity does not (coarse mtimes).

    Yields
    ------
    str
        The name to load.

    Raises
    ------
    LibraryError
        No private copy could be written anywhere.
    """
    real = os.path.realpath(path)
    stat = os.stat(real)
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, signed)
    unchanged = identity[:4] == (read_stat.st_dev, read_stat.st_ino, read_stat.st_size, read_stat.st_mtime_ns)
    with _DLOPENED_LOCK:
        same = _DLOPENED.setdefault(real, identity) == identity
    if same and unchanged and real.endswith(".so"):
        yield path
        return
    name = os.path.basename(real)
    name = name if name.endswith(".so") else f"{name}.so"
    problems = []
    for folder in (os.path.dirname(real), None):  # beside it (a noexec /tmp cannot map code), else tmp
        try:
            tmp = tempfile.mkdtemp(prefix=".pbtvm_load_", dir=folder)
        except OSError as err:
            problems.append(f"{folder or tempfile.gettempdir()}: {err.strerror or err}")
            continue
        try:
            private = os.path.join(tmp, name)
            try:
                with open(private, "wb") as f:
                    f.write(data)
            except OSError as err:
                problems.append(f"{tmp}: {err.strerror or err}")
                continue
            yield private
            return
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise LibraryError(f"{path}: cannot write the private copy it is loaded from ({'; '.join(problems)})")


def read_library(path: str) -> bytes:
    """The bytes of the file ``path``, a pbtvm library (read once by :func:`pbtvm.load`, for the
    manifest and both checksums).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist; ``IsADirectoryError`` if it is a directory.
    """
    if os.path.isdir(path):
        lstm = os.path.isfile(os.path.join(path, "lstm.json"))
        hint = ": an exported LSTM, load it with pbtvm.lstm.load_lstm" if lstm else ""
        raise IsADirectoryError(f"{path} is a directory, not a pbtvm library (.so){hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        return f.read()


def read_manifest(path: str, data: bytes | None = None) -> dict:
    """The manifest of a pbtvm library, without loading it (``data``: the file's bytes, if
    already read by :func:`read_library`).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist; ``IsADirectoryError`` if it is a directory.
    LibraryError
        If the file is not an ELF library, has no pbtvm manifest, or the manifest is corrupt.
    """
    raw = read_elf_section(path, MANIFEST_SECTION, read_library(path) if data is None else data)
    if raw is None:
        raise LibraryError(f"{path} is not a pbtvm module (no {MANIFEST_SECTION} section)")
    try:
        return json.loads(raw.rstrip(b"\0").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LibraryError(f"{path}: the pbtvm manifest is corrupt ({err})") from err


def device_modules(path: str) -> list[dict]:
    """Kinds and formats of the device modules packed in a pbtvm library (for ``inspect``)."""
    blob = read_elf_section(path, DEVBIN_SECTION)
    if blob is None:
        return []
    _, _, modules = parse_blob(blob)
    out = []
    for m in modules:
        entry = {"kind": m.kind, "bytes": 0 if m.payload is None else len(m.payload)}
        if m.kind == "cuda":
            entry["format"] = cuda_payload_format(m.payload)
        out.append(entry)
    return out


def cuda_binaries(path: str) -> list[bytes]:
    """The compiled CUDA images (fatbin/cubin bytes) packed in a pbtvm library."""
    blob = read_elf_section(path, DEVBIN_SECTION)
    if blob is None:
        return []
    return [cuda_payload_code(m.payload) for m in parse_blob(blob)[2] if m.kind == "cuda"]


def cuda_launch_tags(path: str) -> dict[str, list[str]]:
    """``{kernel: launch tags}`` of the CUDA modules packed in a pbtvm library: the thread axes
    and the launch flags each kernel is launched with (TVM's function info, e.g.
    :data:`pbtvm.names.LAUNCH_PROGRAMMATIC`).

    Raises
    ------
    LibraryError
        If a CUDA module's function info does not parse (another TVM's serialization).
    """
    blob = read_elf_section(path, DEVBIN_SECTION)
    out: dict[str, list[str]] = {}
    for m in parse_blob(blob)[2] if blob is not None else []:
        if m.kind != "cuda":
            continue
        r = _Reader(m.payload)
        try:
            r.raw()  # the format
            for _ in range(r.u64()):  # name, name, arg types (DLDataType), launch tags, arg tags (int32)
                name = r.raw().decode()
                r.raw()
                r.skip(4 * r.u64())
                if name in out:
                    raise LibraryError(f"kernel {name} is in two CUDA modules of {path}")
                out[name] = [r.raw().decode() for _ in range(r.u64())]
                r.skip(4 * r.u64())
        except (struct.error, UnicodeDecodeError) as err:
            raise LibraryError(f"cannot read the CUDA function info in {path}") from err
        if r.pos + 8 + len(cuda_payload_code(m.payload)) != len(m.payload):
            raise LibraryError(f"the CUDA function info in {path} does not end where its code starts")
    return out
