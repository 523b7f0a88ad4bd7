"""VLM captioning: SA1B-CoRS and SA1B-DeRS expressions, and the re-grounding check."""
