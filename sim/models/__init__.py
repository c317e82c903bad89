"""Models: small ones for the bundled tasks and the PowerSGD paper's models (shapes from real modules)."""
from .init import build
from .small import digits_cnn, fashion_cnn, linear, mlp
from .paper import lstm_wikitext2, resnet18_cifar

__all__ = ["build", "digits_cnn", "fashion_cnn", "linear", "mlp", "lstm_wikitext2", "resnet18_cifar"]
