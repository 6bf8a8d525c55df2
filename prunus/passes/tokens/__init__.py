"""Token dropping: score -> select -> gather points inserted into the forward pass."""
from prunus.passes.tokens.drop import DropTokens

__all__ = ["DropTokens"]
