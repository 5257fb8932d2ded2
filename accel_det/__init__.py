"""accel_det: train object detectors with HuggingFace Accelerate from a TOML recipe."""

__version__ = "0.1.0"
