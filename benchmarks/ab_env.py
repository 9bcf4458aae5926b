"""A/B of environment settings on one of the seed's benchmarks, in one call on one machine.

Each setting (a space-separated list of NAME=VALUE; "" = the defaults) runs the benchmark in a
fresh process (nmoe reads its NMOE_* switches once per process), rounds interleaved (A B A B ...)
so that drift of the machine shows as spread within a setting rather than as a difference between
settings. The benchmark's last line (its JSON figures) is parsed; a table of the chosen figures per
setting and round is printed, then one JSON line {setting: {key: [value per round]}}.

    python benchmarks/ab_env.py --set "NMOE_MLA_PAIR=1" --set "NMOE_MLA_PAIR=0" [--rounds 2] \\
        [--module nmoe.serve.benchmark_lmsys_e2e] [--keys decode_step_ms,decode_floor_ratio] \\
        -- --device cuda --random-weights --simulate-world-size 8 --prefill-requests 1 --prefill-lens 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def parse_setting(text: str) -> dict[str, str]:
    env = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"setting {text!r}: {item!r} is not NAME=VALUE")
        env[name] = value
    return env


def run_once(module: str, flags: list[str], setting: dict[str, str], timeout: float) -> dict:
    env = dict(os.environ, **setting)
    proc = subprocess.run([sys.executable, "-m", module, *flags], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{module} under {setting or 'the defaults'} exited {proc.returncode}:\n"
                         f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", dest="settings", default=[], help="NAME=VALUE ... (repeatable)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--module", default="nmoe.serve.benchmark_lmsys_e2e")
    ap.add_argument("--keys", default="decode_step_ms,decode_floor_ms,decode_floor_ratio")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    args = ap.parse_args(own)
    if len(args.settings) < 2:
        raise SystemExit("give at least two --set settings to compare")
    settings = [(s, parse_setting(s)) for s in args.settings]
    keys = [k for k in args.keys.split(",") if k]
    results: dict[str, dict[str, list[float]]] = {s: {k: [] for k in keys} for s, _ in settings}
    for _ in range(args.rounds):
        for text, env in settings:
            figures = run_once(args.module, flags, env, args.timeout)
            for k in keys:
                if k not in figures:
                    raise SystemExit(f"{args.module} printed no {k!r} (it has: {', '.join(sorted(figures))})")
                results[text][k].append(figures[k])
            # as it goes, so that a run cut short by the device's time limit still shows its figures
            print(f"{text or '(defaults)'}: " + ", ".join(f"{k} {figures[k]:.4g}" for k in keys), flush=True)
    for k in keys:
        print(f"\n{k}:\n| setting | " + " | ".join(f"round {r + 1}" for r in range(args.rounds)) + " | min |")
        print("| --- " * (args.rounds + 2) + "|")
        for text, _ in settings:
            vals = results[text][k]
            print(f"| {text or '(defaults)'} | " + " | ".join(f"{v:.4g}" for v in vals) + f" | {min(vals):.4g} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
