"""`python -m bench [name ...]`: run benchmarks and print their figures (default: all of BENCHMARKS)."""
from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = ("ingest", "memory", "enrich")


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS and n != "loadgen"]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"bench.{name}":
                raise
            print(f"== {name}: skipped (bench/{name}.py does not exist yet)\n")
            continue
        print(f"== {name}")
        started = time.monotonic()
        module.main()
        print(f"   ({time.monotonic() - started:.0f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
