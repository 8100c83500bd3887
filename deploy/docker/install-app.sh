#!/bin/sh
# The Dockerfile's install steps, in one script so CI runs exactly what the image build runs
# (tests/deploy/test_container.py: there is no Docker engine on the CI machine).
#   install-app.sh PREFIX SRC   -> a virtualenv at PREFIX with the serving install of SRC (no torch) + dumb-init
set -eu
prefix="$1"
src="$2"
python3 -m venv "$prefix"
"$prefix/bin/pip" install --no-cache-dir --disable-pip-version-check --quiet "$src" "dumb-init==1.2.5.post1"
# Fail the build now, not at the first request, if the serving install is incomplete.
"$prefix/bin/python" -c "import app.service.app, faiss, hnswlib, onnxruntime, PIL, pillow_heif"
"$prefix/bin/vps" --help > /dev/null
