"""cnnedge: train small CNNs, export them to verified ONNX, and run them fast on edge devices."""

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import cnnedge` stays cheap and torch-free.
    if name == "Predictor":
        from cnnedge.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'cnnedge' has no attribute {name!r}")
