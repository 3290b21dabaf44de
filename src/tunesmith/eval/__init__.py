"""Metrics per objective."""
