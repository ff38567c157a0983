"""What trains and exports, with PyTorch (the `cnnedge[train]` extra): zoo (the networks and their documented
layer tables), data, checkpoint, trainer, export (verified ONNX), inspect and plots. May use cnnedge.infer;
cnnedge.infer never imports this package."""
