#!/usr/bin/env bash
# Fails when the notebooks are not clean (nbdev_clean would change them) or the library is not what
# nbdev_export makes of them. Compares content hashes before and after, so untracked files count too.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
snapshot() { find nbs trainloop_nb -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' \
             -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha1sum; }
before=$(snapshot)
"$bin/nbdev_export"
"$bin/nbdev_clean"
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "Notebooks and library are out of sync. Changed by nbdev_export / nbdev_clean:" >&2
  diff <(echo "$before") <(echo "$after") | grep '^>' | awk '{print "  " $3}' >&2
  echo "Run nbdev_export and nbdev_clean, then commit the result." >&2
  exit 1
fi
echo "notebooks clean, library in sync with nbs/"
