"""Stable ids: hashes of canonical JSON, so that the same thing gets the same id in every
process and on every machine."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def hashed_id(zoo: str, payload: dict[str, Any]) -> str:
    """`<zoo>-<12 hex>`: a sha256 of the zoo name and a canonical JSON payload."""
    text = json.dumps({"zoo": zoo, **payload}, sort_keys=True, separators=(",", ":"))
    return f"{zoo}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
