"""MBT (Attention Bottlenecks for Multimodal Fusion, Nagrani et al. 2021) tooling for
mbt-edge: config + presets, analytic FLOPs, PyTorch model, ONNX export, scenic checkpoint
conversion, training, and a NumPy log-mel reference. Importing the package needs only
numpy; torch is imported by the modules that need it (model, export, train, conversion).
"""

from .config import MBTConfig, PRESETS, preset  # noqa: F401
