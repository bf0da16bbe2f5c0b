"""The export toolchain: ONNX graphs with parity gates, precision variants, TensorRT engines."""
