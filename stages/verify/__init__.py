"""Verify: the SAM2 backend and the consistency filter / RefCOCO-M mask cleaner built on it."""
