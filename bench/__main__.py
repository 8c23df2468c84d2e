"""`python -m bench [name ...] [options]`: run benchmarks and print their figures.

Without names, all of BENCHMARKS run, in that order (ON_REQUEST's only when named). Options (from
the first argument that starts with "-") go to the benchmarks named: `python -m bench enrich --messages 2000`. ingest and memory
take theirs from the environment (BENCH_DURATION, BENCH_CONNECTIONS, BENCH_CALLBACKS, ...).
"""
from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = ("ingest", "memory", "enrich", "forward")
ON_REQUEST = ("reading",)          # run only when named: it builds a 10-million-message database (~15 min)


def main(argv: list[str]) -> int:
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names, options = argv[:split] or list(BENCHMARKS), argv[split:]
    unknown = [n for n in names if n not in BENCHMARKS + ON_REQUEST]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS + ON_REQUEST)}",
              file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        importlib.import_module(f"bench.{name}").main(options)
        print(f"   ({time.monotonic() - started:.0f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
