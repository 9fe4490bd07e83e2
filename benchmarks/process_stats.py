"""Run a module as `python -m` would and record what the process took: `python process_stats.py OUT.json module args`.

OUT.json gets `peak_rss_bytes` (VmHWM: resident memory at its peak, file-backed pages of memory-mapped files included),
`peak_anon_bytes` (the largest RssAnon sampled every 20 ms: memory the process allocated, page cache excluded) and
`write_bytes` (wchar: every byte the process passed to write(), to files, pipes and logs alike), read from /proc (Linux).
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import threading
import time


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def io_field(field: str) -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    out, module, sys.argv = sys.argv[1], sys.argv[2], [sys.argv[2], *sys.argv[3:]]
    peak = {"anon": 0}

    def sample():
        while True:
            peak["anon"] = max(peak["anon"], status("RssAnon"))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    def record():
        peak["anon"] = max(peak["anon"], status("RssAnon"))
        stats = {"peak_rss_bytes": status("VmHWM"), "peak_anon_bytes": peak["anon"], "write_bytes": io_field("wchar")}
        with open(out, "w") as f:
            json.dump(stats, f)

    atexit.register(record)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
