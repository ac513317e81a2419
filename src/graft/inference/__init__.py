"""A saved model in use: class probabilities, explanations, ONNX export and the ONNX file."""
