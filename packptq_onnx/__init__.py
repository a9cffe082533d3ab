"""packptq-onnx: ONNX model in -> mixed-precision QDQ ONNX model out, proven in onnxruntime."""

__version__ = "0.1.0"
