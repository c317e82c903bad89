"""Models: small ones for the bundled tasks and the PowerSGD paper's models (shapes from real modules)."""
from .init import build, init_parameters
from .small import digits_cnn, linear, mlp

__all__ = ["build", "init_parameters", "digits_cnn", "linear", "mlp"]
