#!/usr/bin/env python3
"""Writes TF Serving warm-up files: <version>/assets.extra/tf_serving_warmup_requests, a
TFRecord file of PredictionLog records (TensorFlow's own writer and TF Serving's protos),
which modelgate replays before a version serves (--enable_model_warmup, on by default).

    python models/warmup.py demo models       # the demo mlp's versions (make setup)
    python models/warmup.py write VERSION_DIR NAME=FILE.npy [NAME=FILE.npy ...]
        [--signature NAME] [--copies N]       # one Predict record from example inputs

From Python:

    from warmup import write_warmup
    write_warmup("models/mlp/2", [{"images": np.zeros((1, 784), np.float32)}])
"""

import argparse
import os
import sys

import numpy as np

# One writer of warm-up files: the export command's.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from modelgate_export import write_warmup  # noqa: E402


def demo(base):
    """The demo mlp: a 1-row and an 8-row request per version."""
    rng = np.random.default_rng(0)
    requests = [{"images": rng.random((rows, 784), dtype=np.float32)} for rows in (1, 8)]
    for version in ("1", "2"):
        print("wrote", write_warmup(os.path.join(base, "mlp", version), requests, model_name="mlp"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("demo").add_argument("base")
    write = sub.add_parser("write")
    write.add_argument("version_dir")
    write.add_argument("inputs", nargs="+", metavar="NAME=FILE.npy")
    write.add_argument("--signature", default="")
    write.add_argument("--copies", type=int, default=1)
    args = parser.parse_args(argv)
    if args.what == "demo":
        demo(args.base)
        return
    inputs = {}
    for item in args.inputs:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"{item}: expected NAME=FILE.npy")
        inputs[name] = np.load(path)
    print("wrote", write_warmup(args.version_dir, [inputs] * args.copies, args.signature))


if __name__ == "__main__":
    sys.exit(main())
