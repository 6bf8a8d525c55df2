"""The model zoo: tiny random models for tests (real-weight loaders arrive with the Models issue)."""
from prunus.models.tiny import ARCHS, example_inputs, tiny

__all__ = ["ARCHS", "example_inputs", "tiny"]
