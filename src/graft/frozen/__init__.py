"""The frozen network's outputs per image view, computed once and cached: the store and its keys,
pooled features, the trunk/top split for partial, and the torch and ONNX Runtime runners."""
