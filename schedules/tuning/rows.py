"""Rows of a MetaSchedule JSON database: what a valid row is, checked before MetaSchedule reads them.

MetaSchedule itself would crash (or segfault) on a malformed row; :func:`check_rows` names the file
and line instead.
"""

from __future__ import annotations

import json
from pathlib import Path

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


class TuningLogError(ValueError):
    """A tuning log that cannot be read (corrupt JSON, truncated, wrong layout)."""


def _workload_row_problem(row: object) -> str:
    if not (isinstance(row, list) and len(row) == 2 and all(isinstance(v, str) for v in row)):
        return "expected [hash, module] strings"
    return ""


def _record_row_problem(row: object, n_workloads: int) -> str:
    if not (isinstance(row, list) and len(row) == 2 and type(row[0]) is int):
        return "expected [workload index, record]"
    if not 0 <= row[0] < n_workloads:
        return f"workload index {row[0]} but the log has {n_workloads} workload(s)"
    rec = row[1]
    if not (isinstance(rec, list) and len(rec) == 4):
        return "expected a record [trace, run_secs, target, arg_info]"
    trace, secs, target, args = rec
    if not isinstance(trace, list) or not isinstance(args, list) or not isinstance(target, dict):
        return "trace, target or arg_info has the wrong type"
    if secs is not None and not (isinstance(secs, list) and all(isinstance(t, int | float) for t in secs)):
        return "run_secs is not a list of numbers"
    return ""


def check_rows(log_dir: Path) -> None:
    """Raise :class:`TuningLogError` (file and line) unless every row of the log in ``log_dir`` is a MetaSchedule row.

    A workload row is ``[structural hash, module]`` (two strings); a record row is
    ``[workload index, [trace, run_secs, target, arg_info]]`` with the index naming a workload
    row. MetaSchedule itself would crash (or segfault) on anything else.
    """
    n_workloads = 0
    for name in (WORKLOADS, RECORDS):
        path = Path(log_dir) / name
        if not path.exists():
            continue
        for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            where = f"tuning log {path} is corrupt at line {lineno}"
            try:
                row = json.loads(raw.decode())
            except UnicodeDecodeError:
                raise TuningLogError(f"{where}: not text (binary data)") from None
            except json.JSONDecodeError as err:
                raise TuningLogError(f"{where}: {err}") from None
            why = _workload_row_problem(row) if name == WORKLOADS else _record_row_problem(row, n_workloads)
            if why:
                raise TuningLogError(f"{where}: not a MetaSchedule {name.split('_')[-1][:-5]} row ({why})")
            n_workloads += name == WORKLOADS


__all__ = ["RECORDS", "WORKLOADS", "TuningLogError", "check_rows"]
