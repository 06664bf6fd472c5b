"""DenseNet-121 features (torchvision layout), shared by the chest and spine radiograph models."""
from __future__ import annotations

from .common import Graph

BLOCKS = (6, 12, 24, 16)
GROWTH = 32
BN_SIZE = 4
INIT_FEATURES = 64
COMPRESSION = 0.5
SPEC = f"densenet121 blocks={BLOCKS} growth={GROWTH} bn_size={BN_SIZE} init={INIT_FEATURES} compression={COMPRESSION}"


def backbone(g: Graph, x: str = "image") -> tuple[str, int]:
    """DenseNet-121 up to the 1024-wide global average pool; returns (tensor, width)."""
    x = g.conv(x, 3, INIT_FEATURES, 7, stride=2, pad=3)
    x = g.bn_relu(x, INIT_FEATURES)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = INIT_FEATURES
    for block, n_layers in enumerate(BLOCKS):
        features = [x]
        for _ in range(n_layers):
            cat = features[0] if len(features) == 1 else g.op("Concat", features, axis=1)
            y = g.bn_relu(cat, channels)
            y = g.conv(y, channels, BN_SIZE * GROWTH, 1)
            y = g.bn_relu(y, BN_SIZE * GROWTH)
            y = g.conv(y, BN_SIZE * GROWTH, GROWTH, 3, pad=1)
            features.append(y)
            channels += GROWTH
        x = g.op("Concat", features, axis=1)
        if block != len(BLOCKS) - 1:
            out_channels = int(channels * COMPRESSION)
            x = g.bn_relu(x, channels)
            x = g.conv(x, channels, out_channels, 1)
            x = g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            channels = out_channels
    x = g.bn_relu(x, channels)
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    return x, channels
