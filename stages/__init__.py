"""Pipeline stages: pure functions plus thin Beam wrappers."""
