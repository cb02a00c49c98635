"""Option choices and defaults the command line needs: kept free of torch, numpy and sklearn so that
`chai-compile --help` does not import them. The modules that use the values import them from here."""

from __future__ import annotations

BUILTIN_CALIBRATION = "builtin"  # --calib value: the offline corpus shipped with Python
FEATURES = ("rows", "first_n")  # attention features that decide clusters
METHODS = ("agglomerative", "kmeans")  # clustering algorithms
REPRESENTATIVES = ("auto", "medoid", "lowest", "kv-min")  # how a cluster's score head is chosen
GREEDY_STEPS = 32  # greedy steps export, verify-artifact and verify ARTIFACT_DIR compare by default
DEFAULT_OPSET = 23
DEVICES = ("cpu", "cuda", "cuda:N")  # what --device accepts, for messages
GRAPH_NAME = "model.onnx"  # an export directory's graph
DATA_NAME = GRAPH_NAME + ".data"  # and its external weights (what torch.onnx's ONNXProgram.save writes)
