"""The one training loop and what it needs: batching, optimizer, checkpoints, feature cache."""
