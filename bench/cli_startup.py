"""How long the command line takes to answer: `lsm --help` and `lsm --version` import no torch.

    python -m bench.cli_startup [--repeat 5]

Times each command in a fresh interpreter (the median of --repeat runs) beside a bare
`python -c pass` and `python -c "import torch"`, and prints the ratios measured in the
same run: absolute times depend on the machine and its load, the ratios much less.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "lsm --version": [sys.executable, "-m", "lsm_registry", "--version"],
    "lsm --help": [sys.executable, "-m", "lsm_registry", "--help"],
    "lsm show recipes/quickstart.toml": [sys.executable, "-m", "lsm_registry", "show", "recipes/quickstart.toml"],
}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the median is reported (default 5)")
    args = parser.parse_args(argv)
    times = {name: statistics.median(timed(cmd) for _ in range(args.repeat)) for name, cmd in CASES.items()}
    torch_time = times["python -c 'import torch'"]
    print(f"# command: python -m bench.cli_startup --repeat {args.repeat}")
    print("| command | median s | / import torch |")
    print("|---|---:|---:|")
    for name, seconds in times.items():
        print(f"| `{name}` | {seconds:.2f} | {seconds / torch_time:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
