"""cnnedge: train small CNNs, export them to verified ONNX, and run them fast on edge devices."""

import os

__version__ = "0.2.0"
__all__ = ["Predictor", "__version__"]

# Decompression bombs: OpenCV refuses an image whose header declares more pixels than this, before it
# allocates anything. It reads the variable once, when cv2 loads, hence here: before any module imports
# cv2. Keep it equal to cnnedge.preprocess.MAX_PIXELS (checked again after decoding).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "80000000")


def __getattr__(name: str):
    # Lazy, so `import cnnedge` stays cheap and torch-free.
    if name == "Predictor":
        from cnnedge.infer.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'cnnedge' has no attribute {name!r}")
