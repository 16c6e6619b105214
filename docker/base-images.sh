#!/usr/bin/env bash
# Build the two local base images the Dockerfile takes as BUILD_IMAGE and RUNTIME_IMAGE, for
# machines without an image registry: Debian minbase root filesystems made with debootstrap and
# imported with `docker import`. An image that already exists is kept (delete it to rebuild).
#
#   docker/base-images.sh [SUITE] [MIRROR]     defaults: bookworm http://deb.debian.org/debian
# Prints the two image names. Needs root, debootstrap and a running Docker engine.
set -euo pipefail
suite=${1:-bookworm}
mirror=${2:-http://deb.debian.org/debian}
# The revision after the suite changes whenever the package lists below change, so that images
# cached under the old name are not taken for the new ones (2: socat in the runtime image).
revision=2
build_image=hvsock-base-build:$suite-$revision
runtime_image=hvsock-base-runtime:$suite-$revision

make_image() {  # NAME PACKAGES
  local name=$1 packages=$2 root
  if docker image inspect "$name" >/dev/null 2>&1; then
    echo "kept $name" >&2
    return
  fi
  root=$(mktemp -d)
  trap 'rm -rf "$root"' RETURN
  echo "debootstrap $suite ($packages) for $name" >&2
  debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >&2
  # Keep the images small: package lists and caches are not needed at run time.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$name" >/dev/null
  echo "built $name" >&2
}

# The build stage compiles the Cython ring and the vsock shim: a compiler, the Python and libc
# headers. The runtime runs Python (the virtual environment comes from the build stage) and
# socat, the unmodified vsock program of the testbed's vm-vsock (`hvsock run`).
make_image "$build_image" python3,python3-venv,python3-dev,gcc,libc6-dev
make_image "$runtime_image" python3,socat
echo "$build_image $runtime_image"
