"""Kafka stages: embed (onnxruntime, faiss) and detect (state, checkpoints)."""
