"""Structured pruning: channel-group importance, allocation and weight surgery, and layer removal (issue 4)."""
from prunus.passes.prune.layers import PruneLayers
from prunus.passes.prune.structured import PruneHeads, PruneHidden, PruneMLP

__all__ = ["PruneHeads", "PruneHidden", "PruneLayers", "PruneMLP"]
