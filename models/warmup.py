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
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def write_warmup(version_dir, requests, signature="", model_name=""):
    """Writes one Predict record per dict of named numpy inputs in `requests`."""
    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for inputs in requests:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


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
