"""Seeds derived by name: init, data order and label noise are separable sources of randomness.

A run sets `seed`; unless a config sets them apart, each source gets its own seed derived from it
by hashing (seed, purpose). Nothing here depends on a member's position in a cohort.
"""

import hashlib


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for `purpose` (e.g. "init", "order", "noise") derived from `seed`."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_for(given: int | None, run_seed: int, purpose: str) -> int:
    """The seed a run uses for `purpose`: the one its config sets (`init_seed`, `order_seed`,
    `noise_seed`), else the one derived from the run's seed."""
    return given if given is not None else derive_seed(run_seed, purpose)
