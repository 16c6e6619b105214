#!/usr/bin/env bash
# Download wheels for the image build into docker/wheels/, for machines whose containers cannot
# reach the package index. The project's dependencies and build requirements are read from
# pyproject.toml; the wheels are for the Python of the build image (default: this python3's).
#
#   docker/download-wheels.sh [PYTHON_VERSION]      e.g. docker/download-wheels.sh 3.11
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
version=${1:-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
mapfile -t requirements < <("$PYTHON" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
for requirement in project["build-system"]["requires"] + project["project"]["dependencies"]:
    print(requirement)
PY
)
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --python-version "$version" --dest docker/wheels "${requirements[@]}"
echo "docker/wheels: $(ls docker/wheels/*.whl | wc -l) wheels for Python $version"
