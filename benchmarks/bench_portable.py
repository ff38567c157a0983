"""Is the portable graph as fast in onnxruntime as the one it replaces? Two exports of the same checkpoint,
run exactly as cnnedge's Runtime runs them, fp32 and int8, taking turns (so a load change hurts all alike).

    uv run python benchmarks/bench_portable.py OLD_DIR NEW_DIR [--batches 1,64,256] [--seconds 3]

OLD_DIR and NEW_DIR each hold cnn.onnx and cnn.int8.onnx: for instance the shipped export/ before this
change (Shape -> Reshape -> Concat -> Reshape flatten, int32 int8 biases) and a fresh `cnnedge export
models/cnn.pt --quantize int8 --out NEW_DIR/cnn.onnx`. Prints images/s per model and batch and new/old.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from cnnedge.bench import time_in_turns
from cnnedge.infer.runtime import Runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--seconds", type=float, default=3.0, help="at least this long per model and batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    models = {(which, precision): Runtime(folder / name, "cpu", args.threads)
              for which, folder in (("old", args.old), ("new", args.new))
              for precision, name in (("fp32", "cnn.onnx"), ("int8", "cnn.int8.onnx"))}
    x = np.random.default_rng(0).random((max(map(int, args.batches.split(","))), 28, 28), np.float32)
    print(f"threads {args.threads}, load average at start {os.getloadavg()[0]:.2f}")
    print("| precision | batch | old images/s | new images/s | new / old |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch in map(int, args.batches.split(",")):
        inputs = {key: rt.normalise(x[:batch]) for key, rt in models.items()}
        times = time_in_turns([lambda key=key, rt=rt: rt.forward(inputs[key]) for key, rt in models.items()],
                              warmup=10, repeat=30, min_time=args.seconds)
        rate = {key: batch / float(np.median(t)) for key, t in zip(models, times)}
        for precision in ("fp32", "int8"):
            old, new = rate[("old", precision)], rate[("new", precision)]
            print(f"| {precision} | {batch} | {old:,.0f} | {new:,.0f} | {new / old:.3f} |")


if __name__ == "__main__":
    main()
