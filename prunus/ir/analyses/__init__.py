"""Analyses passes share; each is a function `Graph -> result`, cached on the graph by name."""
from prunus.ir.analyses.attention_sites import AttentionSite, attention_sites
from prunus.ir.analyses.blocks import Block, blocks
from prunus.ir.analyses.channel_groups import channel_groups
from prunus.ir.analyses.sequence_flow import SequenceFlow, sequence_flow

ANALYSES = {"attention_sites": attention_sites, "blocks": blocks, "channel_groups": channel_groups,
            "sequence_flow": sequence_flow}

__all__ = ["ANALYSES", "AttentionSite", "Block", "SequenceFlow", "attention_sites", "blocks", "sequence_flow"]
