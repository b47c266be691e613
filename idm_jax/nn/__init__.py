"""The networks: the architectures (``models``), their layers and ResNet-18."""
