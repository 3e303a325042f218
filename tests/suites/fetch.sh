#!/usr/bin/env bash
# Fetch the standard libraries' own test suites that tests/test_suite_*.py run against remap,
# into .suites/ (never committed): CPython's test_concurrent_futures from Debian's
# libpython3.X-testsuite for the running Python's X, and joblib's test_parallel.py from the
# joblib sdist on PyPI at the installed joblib's version. Idempotent; needs apt and pip.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.suites
mkdir -p "$dest"
py=${PYTHON:-python}
pkg=$($py -c 'import sys; print("libpython%d.%d-testsuite" % sys.version_info[:2])')
if [ ! -d "$dest/cpython" ]; then
  work=$(mktemp -d)
  (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1) ||
    { apt-get update -q >/dev/null && (cd "$work" && apt-get download "$pkg" >/dev/null); }
  dpkg-deb -x "$work"/"$pkg"_*.deb "$work/x"
  mkdir -p "$dest/cpython"
  cp -r "$work"/x/usr/lib/python3*/test/test_concurrent_futures* "$dest/cpython/"
  dpkg-deb -f "$work"/"$pkg"_*.deb Version >"$dest/cpython/VERSION"
  rm -rf "$work"
fi
version=$($py -c 'import joblib; print(joblib.__version__)')
if [ ! -f "$dest/joblib-$version/joblib/test/test_parallel.py" ]; then
  work=$(mktemp -d)
  $py -m pip download -q --no-deps --no-binary :all: "joblib==$version" -d "$work"
  tar -xzf "$work"/joblib-"$version".tar.gz -C "$dest"
  rm -rf "$work"
fi
echo "suites in $dest: cpython $(cat "$dest/cpython/VERSION"), joblib $version"
