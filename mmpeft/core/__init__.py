"""Layer 0: what every other layer may use (registry, strict schema loading, atomic io, process facts, dtypes)."""

VERSION = "0.1.0"
