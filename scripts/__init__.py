"""Tools beside the hub, run from the source checkout: the demo, its stand-in peers, synthetic data,
the reference-model builder."""
