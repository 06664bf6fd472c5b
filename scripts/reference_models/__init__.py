"""Reference model architectures written as ONNX graphs with onnx.helper (no PyTorch at build time).

One module per model family; `common` holds the graph builder, the data-calibrated head and the
write/skip logic shared by all. `scripts/build_reference_models.py` is the command line.
"""
