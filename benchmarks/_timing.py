"""Shared timing, machine info and output writers for the scripts in benchmarks/.

The code lives in fastvat/bench/timing.py (used by ``python -m fastvat bench`` too); this module
re-exports it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastvat.bench.timing import (  # noqa: E402
    COLUMNS,
    DEFINITIONS,
    Stat,
    TimeLimit,
    check,
    copy_bandwidth,
    format_table,
    machine_info,
    machine_line,
    measure,
    measure_many,
    peak_extra_bytes,
    row,
    sync,
    time_limit,
    try_compile,
    write_csv,
    write_json,
    write_outputs,
    write_png,
)

__all__ = ["COLUMNS", "DEFINITIONS", "Stat", "TimeLimit", "check", "copy_bandwidth", "format_table", "machine_info",
           "machine_line", "measure", "measure_many", "peak_extra_bytes", "row", "sync", "time_limit", "try_compile",
           "write_csv", "write_json", "write_outputs", "write_png"]
