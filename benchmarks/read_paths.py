"""Reading safetensors inputs cold: a private mapping per tensor against ``preadv`` into a fresh
buffer (compose/tensor_io.py, ``MAP_BYTES``), each followed by the executor's NaN/Inf check, and
``cat`` of the same files as the floor. Drops the page cache before every run (needs root).

    python benchmarks/read_paths.py FOLDER [FOLDER ...] --repeats 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def drop_caches() -> None:
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)


def read_all(files: list[Path], mapped: bool) -> tuple[float, float, float]:
    import mmcompose.compose.tensor_io as tio

    tio.MAP_BYTES = 1 << 20 if mapped else 1 << 62
    t0, c0 = time.perf_counter(), os.times()
    for f in files:
        tf = tio.TensorFile(f)
        for name in tf.entries:
            x = tf.read(name)
            tio.all_finite(x)
            del x
        tf.close()
    c1 = os.times()
    return time.perf_counter() - t0, c1.user - c0.user, c1.system - c0.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    files = sorted(f for d in args.folders for f in d.glob("*.safetensors"))
    gb = sum(f.stat().st_size for f in files) / 1e9
    import torch  # noqa: F401  (imported before timing)

    for r in range(args.repeats):
        for mode in ("read", "mapped"):
            drop_caches()
            wall, user, sys_ = read_all(files, mode == "mapped")
            print(f"rep {r} {mode:6s} {gb:.2f} GB {wall:.2f} s (user {user:.2f}, sys {sys_:.2f})")
        drop_caches()
        t = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        print(f"rep {r} cat    {gb:.2f} GB {time.perf_counter() - t:.2f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
