"""Bit-allocation solvers (installed as packptq_onnx.solvers)."""
