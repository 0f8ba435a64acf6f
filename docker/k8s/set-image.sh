#!/usr/bin/env bash
# Points an overlay at an image: rewrites `newName` and `newTag` of its one `images:` entry.
# Used by .github/workflows/release.yml after it pushed the images; also by hand:
#
#   docker/k8s/set-image.sh gpu 123456789012.dkr.ecr.us-east-1.amazonaws.com/modelgate-gpu v1.2.0
#
# usage: set-image.sh OVERLAY IMAGE TAG    (OVERLAY: a directory name under overlays/)
set -euo pipefail

if [ $# -ne 3 ]; then
    sed -n '2,7p' "$0" >&2
    exit 2
fi
overlay=$1
image=$2
tag=$3
file="$(dirname "$0")/overlays/$overlay/kustomization.yaml"

[ -f "$file" ] || { echo "set-image: no overlay '$overlay' ($file)" >&2; exit 1; }
# The reference grammar's characters only, so that neither value can break the YAML or sed.
[[ $image =~ ^[a-z0-9]([a-z0-9._/:-]*[a-z0-9])?$ ]] ||
    { echo "set-image: '$image' is not an image name" >&2; exit 1; }
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] ||
    { echo "set-image: '$tag' is not an image tag" >&2; exit 1; }
for key in newName newTag; do
    count=$(grep -c "^ *$key: " "$file" || true)
    [ "$count" = 1 ] ||
        { echo "set-image: $file has $count '$key:' lines; expected exactly one" >&2; exit 1; }
done

sed -i -E \
    -e "s|^( *newName: ).*|\\1$image|" \
    -e "s|^( *newTag: ).*|\\1$tag|" \
    "$file"
echo "$file: $image:$tag"
