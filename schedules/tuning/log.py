"""The tuning log: a MetaSchedule JSON database per target inside a ``work_dir``, and its checks.

The log lives in ``work_dir/<target key>/`` next to a small ``pbtvm_log.json`` stating the TVM
version, bitplane-format version and target it was made for; :class:`TuningLog` ignores a log made
for anything else with a warning and raises :class:`TuningLogError` on a corrupt one. Tuning holds
an exclusive file lock on the log, so two runs into one ``work_dir`` take turns instead of
interleaving records. Kernels of a :class:`~pbtvm.schedules.rules.KnobRule` (no MetaSchedule trace)
keep their chosen knobs in :data:`KNOB_LOG` in the same directory, and so do the pins of
MetaSchedule kernels held at their default schedule (:func:`.space.default_pin_key`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pbtvm._tvm import TVM_VERSION, meta_schedule, tvm
from pbtvm.bitplane import FORMAT_VERSION
from pbtvm.errors import first_line
from pbtvm.ops import KERNEL_VERSION
from pbtvm.target import TargetInfo

from .rows import RECORDS, WORKLOADS, TuningLogError, check_rows

logger = logging.getLogger(__name__)

#: Version of the ``pbtvm_log.json`` layout.
LOG_SCHEMA = 1
LOG_META = "pbtvm_log.json"
#: File in a target's log directory holding the chosen knobs of :class:`KnobRule` kernels per workload.
KNOB_LOG = "pbtvm_cpu_kernels.json"


def build_versions() -> dict:
    """The versions a log's ``pbtvm_log.json`` must record to be used by this build."""
    return {
        "schema": LOG_SCHEMA,
        "tvm_version": TVM_VERSION,
        "format_version": FORMAT_VERSION,
        "kernel_version": KERNEL_VERSION,
    }


def meta_mismatch(meta: dict, want: dict | None = None) -> str | None:
    """Why a log with metadata ``meta`` cannot be used (None if it can): a key of ``want`` (default
    :func:`build_versions`; :meth:`TuningLog.expected_meta` adds the ``target_key``) it records
    differently or not at all."""
    want = build_versions() if want is None else want
    for key in (*build_versions(), "target_key"):
        if key in want and meta.get(key) != want[key]:
            made = f"{key} is {meta.get(key)!r}" if key in meta else f"it has no {key} (an older pbtvm made it)"
            return f"{made}, this build needs {want[key]!r}: tune again"
    return None


def target_key(target: tvm.target.Target) -> str:
    """Directory name of a target's log: :attr:`pbtvm.target.TargetInfo.log_key`."""
    return TargetInfo.of(target).log_key


@dataclass
class TuningLog:
    """The MetaSchedule database of one target inside a ``work_dir``.

    Parameters
    ----------
    work_dir : path
        Holds one sub-directory per target key. The target's log directory itself (what ``tune``
        prints, ``logs/llvm-znver4``) is taken as its parent: the log is the same.
    target : tvm.target.Target

    Raises
    ------
    TuningLogError
        ``work_dir`` is a file, or an empty string.
    """

    work_dir: Path | str  # a Path once made
    target: tvm.target.Target

    def __post_init__(self) -> None:
        if isinstance(self.work_dir, str) and not self.work_dir.strip():  # Path would read it as "."
            raise TuningLogError("work_dir is empty: give the tuning log directory, e.g. 'pbtvm_logs'")
        self.work_dir = Path(self.work_dir)
        if self.work_dir.exists() and not self.work_dir.is_dir():
            raise TuningLogError(f"work_dir {self.work_dir} is a file, not a directory of tuning logs")
        here = self.work_dir.resolve()  # "." inside the log directory has no name of its own
        if here.name == target_key(self.target) and (here / LOG_META).exists():
            self.work_dir = here.parent

    @property
    def path(self) -> Path:
        """``work_dir/<target key>``."""
        return self.work_dir / target_key(self.target)

    def expected_meta(self) -> dict:
        """What ``pbtvm_log.json`` must say for this log to be used."""
        return {**build_versions(), "target_key": target_key(self.target), "target": str(self.target)}

    def _mismatch(self) -> str | None:
        meta_path = self.path / LOG_META
        try:
            meta = json.loads(meta_path.read_bytes().decode())
        except UnicodeDecodeError:
            raise TuningLogError(f"tuning log {meta_path} is corrupt: not text (binary data)") from None
        except json.JSONDecodeError as err:
            raise TuningLogError(f"tuning log {meta_path} is corrupt: {err}") from None
        if not isinstance(meta, dict):
            raise TuningLogError(f"tuning log {meta_path} is corrupt: expected a JSON object")
        return meta_mismatch(meta, self.expected_meta())

    def _check_records(self) -> None:
        check_rows(self.path)

    def check(self) -> None:
        """Raise :class:`TuningLogError` if the log's metadata or rows are corrupt (what compile checks)."""
        self._mismatch()
        self._check_records()

    def _without_meta(self) -> bool:
        """Whether this target's log directory holds files but no :data:`LOG_META` (a ``.lock``
        that older versions kept inside does not count)."""
        if not self.path.is_dir() or (self.path / LOG_META).exists():
            return False
        return any(p.name != ".lock" for p in self.path.iterdir())

    def usable(self, reading: bool = True) -> bool:
        """Whether a log for this target exists and was made by this TVM and format version.

        Reading, warns (and returns False) when ``work_dir`` only holds logs for other targets,
        the log is from another version or has no metadata; tuning (``reading`` False) starts this
        target's log beside other targets' and moves this target's unusable one aside
        (:meth:`database` says so).
        Raises :class:`TuningLogError` when the log is corrupt.
        """
        if self._without_meta():
            if not reading:  # tuning moves it aside, and says so
                return False
            warnings.warn(
                f"pbtvm: {self.path} holds files but no {LOG_META}, so it is not a tuning log pbtvm wrote (or "
                "its metadata was removed); ignored (default schedules used); tuning moves it aside",
                stacklevel=3,
            )
            return False
        if not (self.path / LOG_META).exists():
            others = [Path(p).parent.name for p in sorted(str(q) for q in self.work_dir.glob(f"*/{LOG_META}"))]
            if (self.work_dir / LOG_META).exists():  # another target's log directory itself
                warnings.warn(
                    f"pbtvm: {self.work_dir} is the tuning log of {self.work_dir.resolve().name}, not of "
                    f"{target_key(self.target)}; pass the directory that holds the logs (default schedules used)",
                    stacklevel=3,
                )
            elif others and reading:
                warnings.warn(
                    f"pbtvm: {self.work_dir} has tuning logs for {', '.join(others)} but none for "
                    f"{target_key(self.target)}; logs from another target are ignored (default schedules used)",
                    stacklevel=3,
                )
            return False
        why = self._mismatch()
        if why is not None:
            if reading:
                warnings.warn(f"pbtvm: ignoring tuning log {self.path}: {why}", stacklevel=3)
            return False
        self._check_records()
        return True

    @property
    def lock_path(self) -> Path:
        """``work_dir/.<target key>.lock``: beside the log directory, not in it, so that a run that
        moves a stale log aside keeps the lock the next run waits on."""
        return self.work_dir / f".{self.path.name}.lock"

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Hold the log's file lock (exclusive while tuning, shared while reading).

        A reader that cannot create the lock file (a read-only ``work_dir``, a shared copy of a
        log) opens it read-only, or reads without it where there is none: no run can tune there
        either. (Earlier pbtvm versions locked ``<log>/.lock`` inside the log directory: a run of
        such a version and one of this one do not take turns.)

        Raises
        ------
        TuningLogError
            ``exclusive`` and the lock file cannot be made (a read-only ``work_dir``).
        """
        try:
            if exclusive:
                self.work_dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.lock_path, "a+")
        except OSError as err:
            if exclusive:
                raise TuningLogError(f"cannot tune into {self.work_dir}: {err.strerror or err}") from None
            try:  # a lock file there already, in a folder this process cannot write: flock reads it too
                fh = open(self.lock_path)
            except OSError:
                fh = None
        if fh is None:
            yield
            return
        with fh:
            if exclusive:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.warning("another tuning run holds %s; waiting for it", self.path)
                    fcntl.flock(fh, fcntl.LOCK_EX)
            else:
                fcntl.flock(fh, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def database(self, create: bool = False) -> object | None:
        """The MetaSchedule ``JSONDatabase``, or None if there is no usable log.

        ``create=True`` (tuning) starts a fresh log when there is none, and moves a log made
        for another version aside to ``<key>.stale-<time>`` with a warning.
        """
        ms = meta_schedule()
        if not self.work_dir.exists() and not create:
            warnings.warn(
                f"pbtvm: tuning work_dir {self.work_dir} does not exist; default schedules used", stacklevel=3
            )
            return None
        if self.path.exists() and not self.path.is_dir():
            raise TuningLogError(
                f"{self.path} is a file, not a tuning log directory: move it aside or delete it"
                + (", then tune again" if create else " (or give another work_dir)")
            )
        if self.usable(reading=not create):
            return self._json_database(ms)
        if not create:
            return None
        if (self.path / LOG_META).exists() or self._without_meta():
            why = self._mismatch() if (self.path / LOG_META).exists() else f"no {LOG_META}"
            stale = self.path.with_name(f"{self.path.name}.stale-{int(time.time())}")
            self.path.rename(stale)
            warnings.warn(f"pbtvm: moved the old tuning log aside to {stale} ({why})", stacklevel=3)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / LOG_META).write_text(json.dumps(self.expected_meta(), indent=1) + "\n")
        return self._json_database(ms)

    def _json_database(self, ms: object) -> object:
        """MetaSchedule's ``JSONDatabase`` on this log's files. A record that is valid JSON but not a
        trace TVM can replay (a hand-edited split factor) makes TVM's reader fail without saying
        which: named here, with what to do."""
        try:
            return ms.database.JSONDatabase(str(self.path / WORKLOADS), str(self.path / RECORDS), allow_missing=True)
        except Exception as err:
            raise TuningLogError(
                f"tuning log {self.path / RECORDS} (or {WORKLOADS} beside it) is corrupt: TVM cannot read its "
                f"records ({first_line(err)}); move {self.path} aside or delete it, then tune again"
            ) from None

    def read_knobs(self) -> dict:
        """The knob log (:data:`KNOB_LOG`): ``{knob key: {knob: value, "us": ..., "default_us": ...,
        "search_us": ...}}``, and ``{default pin key: {"schedule": "default", ...}}`` entries.

        Raises
        ------
        TuningLogError
            If the file is not a JSON object.
        """
        return read_knob_file(self.path / KNOB_LOG)

    def write_knobs(self, knobs: dict) -> None:
        """Replace the knob log with ``knobs`` (call while holding the exclusive lock), in one step:
        a run stopped while writing leaves the old file or the new one, never half of one."""
        path = self.path / KNOB_LOG
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(knobs, indent=1) + "\n")
        os.replace(partial, path)


def read_knob_file(path: Path) -> dict:
    """A knob log file (:data:`KNOB_LOG`), ``{}`` when absent: ``{knob key: {knob: value, "us":
    ..., "default_us": ..., "search_us": ...}}`` (a time is None where that setting failed to build
    or run; ``search_us`` the search's time of the kept setting where it was re-measured beside the
    default) and the pins of :func:`.space.default_pin_key`.

    Raises
    ------
    TuningLogError
        If the file is not a JSON object of objects.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TuningLogError(f"tuning log {path} is corrupt: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise TuningLogError(f"tuning log {path} is corrupt: expected a JSON object of objects")
    return data


__all__ = [
    "KNOB_LOG",
    "LOG_META",
    "RECORDS",
    "WORKLOADS",
    "TuningLog",
    "TuningLogError",
    "check_rows",
    "read_knob_file",
    "target_key",
]
