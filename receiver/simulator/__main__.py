"""python -m receiver.simulator --port 8900 --seed 1 [--config file.json] [--set key=value ...]"""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import SimConfig, Simulator
from .config import parse_value


def build_config(args: argparse.Namespace) -> SimConfig:
    values: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            values.update(json.load(handle))
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        values[key.strip()] = parse_value(raw)
    if args.seed is not None:
        values["seed"] = args.seed
    return SimConfig().replace(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m receiver.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900, help="0 picks a free port")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--config", help="JSON file of SimConfig keys")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="one config key (JSON value)")
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"simulator: bad config: {exc}", file=sys.stderr)
        return 2
    sim = Simulator(config, host=args.host, port=args.port).start()
    print(sim.url, flush=True)
    print(f"auth {sim.auth_url}\nnotify {sim.notify_url}\nanalyse {sim.analyse_url}\n"
          f"static token {sim.static_token}; login {sim.login} / {sim.password}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
