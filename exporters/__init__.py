"""Writers: QDQ ONNX models, annotations and reports (installed as packptq_onnx.exporters)."""
