"""Regenerate the committed JSON Schema: ``python -m cuneiform_sdk.schema``."""

from __future__ import annotations

import sys

from . import generate

if __name__ == "__main__":
    path = generate.write()
    print(f"wrote {path}", file=sys.stderr)
