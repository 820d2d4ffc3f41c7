"""Seeds. `seed_everything` seeds every global generator the same way on every process;
`mix_seed` derives independent seeds for named streams (data order, noise, splits) from a run seed
and counters."""

from __future__ import annotations

from accelerate.utils import set_seed

_MASK64 = (1 << 64) - 1


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy and torch (all devices) with the same seed on every process, so
    a run is reproducible and every process starts from the same initial state."""
    set_seed(seed)


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (splitmix64 over the parts): distinct inputs give unrelated
    generator seeds. `seed + epoch` or `seed * 1_000_003 + epoch` would not: runs with nearby seeds
    would share most of their epochs' orders."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state
