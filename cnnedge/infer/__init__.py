"""What runs on a device: onnxruntime (or OpenCV DNN alone), OpenCV and numpy, never torch (a test proves it).

files (reading images, walking folders), preprocess (photos and drawings -> the network's input), modelinfo
(the metadata an exported model carries), onnxfile (that metadata and the graph's signature read from the
file's bytes), runtime (the runtime interface, and onnxruntime sessions), opencv (OpenCV DNN behind the same
interface), predictor (the Python API), predict, enroll, info, webcam and serve (the commands; serve's page in
static/), gallery (few-shot classes)."""
