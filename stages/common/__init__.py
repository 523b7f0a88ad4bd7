"""Shared by every stage: mask geometry in RLE space, trainer targets, Qwen resizing, torch device rules."""
