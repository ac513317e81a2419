"""Backbones by name (embedded, torchvision, timm), their weights, freezing by block name, and the
model files."""
