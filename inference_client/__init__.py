"""Talking to Triton, and what the hub knows about the models it serves.

- `models`: model descriptions (labels, codes, thresholds, preprocessing) from mappings/models/*.yaml
- `routing`: which models a study goes to, from mappings/routing.yaml (pure, no I/O but the file read)
- `triton`: a Triton HTTP client with timeouts and errors that say whether to retry
"""
