"""Model loading and the task models tunesmith trains."""
