#!/bin/sh
# Fetch the sources used by build_mix.py into DEST (default /tmp/corpus/src); no unpacking needed:
# build_mix.py reads .deb and .tar.gz archives directly with the stdlib.
# Usage: sh fetch.sh [DEST]   (then: python3 build_mix.py --src DEST)
set -e
DEST=${1:-/tmp/corpus/src}
mkdir -p "$DEST"
cd "$DEST"
apt-get update
# Debian 12 (bookworm) packages; versions are those the build script expects
apt-get download \
  r-cran-janeaustenr=1.0.0-1 \
  debian-handbook=11.20220922 \
  debian-reference-en=2.100 \
  python3.11-doc=3.11.2-6+deb12u9 \
  manpages=6.03-2 \
  manpages-dev=6.03-2 \
  gnome-user-docs=43.0-2 \
  xz-utils=5.4.1-1+deb12u2 \
  libpython3.11-stdlib=3.11.2-6+deb12u9 \
  libpython3.11-minimal=3.11.2-6+deb12u9
# PyPI source distributions
pip download --no-deps --no-binary :all: -d . \
  brotli==1.2.1 chatterbot-corpus==1.3.3 click==8.5.1
