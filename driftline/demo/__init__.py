"""Offline demo model (MobileNetV2 → ONNX) and demo data (opencv-doc, scikit-image)."""
