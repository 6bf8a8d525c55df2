"""Token dropping: score -> select -> gather points inserted into the forward pass."""
