"""Objectives turn records into batches and batches into a loss and metrics (DESIGN §5)."""
