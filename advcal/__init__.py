"""advcal: adversarial calibration heads for frozen multimodal Bind encoders."""

__version__ = "0.1.0"
