#!/bin/sh
# The image's entrypoint: runs modelgate with the TF Serving flags it is given, so that a
# Deployment written for tensorflow/serving runs unchanged.
#
# Like tensorflow/serving's own entrypoint, with no model flags it serves one model from
# $MODEL_BASE_PATH/$MODEL_NAME (default /models/model): `docker run -v $PWD/m:/models/model`.
# Given --model_config_file, --model_base_path or --model_name, it adds nothing.
#
# MODELGATE_BIN overrides the binary (to run this script outside the image).
set -eu

bin=${MODELGATE_BIN:-/usr/local/bin/modelgate}

for arg in "$@"; do
    case $arg in
    --model_config_file | --model_config_file=* | --model_base_path | --model_base_path=* | \
        --model_name | --model_name=* | -h | --help | -V | --version)
        exec "$bin" "$@"
        ;;
    esac
done

name=${MODEL_NAME:-model}
exec "$bin" --model_name="$name" --model_base_path="${MODEL_BASE_PATH:-/models}/$name" "$@"
