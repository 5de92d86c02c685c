#!/usr/bin/env bash
# A self-contained HTML page (a `qless compare` or `qless report` page) rendered by headless Chromium and
# saved as a PNG cropped to the page's content.
# Needs Debian's chromium (apt-get update && apt-get install -y chromium) and Pillow (the dev virtualenv).
# Usage: docs/screenshot-page.sh PAGE.html OUT.png
set -euo pipefail
PAGE=$(realpath "$1")
OUT=$2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,20000 \
    --screenshot="$TMP/page.png" "file://$PAGE" 2>&1 | { grep -v -e dbus -e '^$' || true; }

python - "$TMP/page.png" "$OUT" <<'PY'
"""Crop the screenshot to the page's content (the window is taller than the page)."""
import sys

import numpy as np
from PIL import Image

page = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
rows = np.flatnonzero((page < 250).any(axis=(1, 2)))
if rows[-1] > page.shape[0] - 60:
    sys.exit(f"the page is longer than the window ({page.shape[0]} px): raise --window-size in docs/screenshot-page.sh")
# a 256-colour palette keeps text and plots sharp at a third of the bytes
Image.fromarray(page[: rows[-1] + 40]).quantize(colors=256).save(sys.argv[2], optimize=True)
print(f"{sys.argv[2]}: {page.shape[1]} x {rows[-1] + 40}")
PY
