"""Losses as functions on tensors: the chunked next-token loss and log-probabilities of causal LMs
(lm.py), and the preference losses (preference.py). Tasks compose them; they know no task."""
