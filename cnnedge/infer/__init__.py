"""What runs on a device: onnxruntime, OpenCV and numpy, never torch (a test proves it).

files (reading images, walking folders), preprocess (photos and drawings -> the network's input), modelinfo
(the metadata an exported model carries), runtime (onnxruntime sessions), predictor (the Python API),
predict, enroll, info, webcam and serve (the commands; serve's page in static/), gallery (few-shot classes)."""
