#!/bin/sh
# Bakes the demo index into the image (the `demo-index` stage); CI runs it too (tests/deploy/test_container.py).
#   build-demo-index.sh PREFIX SRC OUT
set -eu
prefix="$1"
src="$2"
out="$3"
"$prefix/bin/vps" build-index \
  --catalogue "$src/examples/grocery/catalogue.csv" --images-root "$src/examples/grocery/images" \
  --calibration-queries "$src/examples/grocery/calibration.csv" \
  --model "$src/models/grocery-lite1-ms512-sp208-int8" --out "$out"
