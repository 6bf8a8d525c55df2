"""Evaluation of a model or an OptimizedModel: perplexity, long-context perplexity, passkey retrieval,
output fidelity, embedding similarity and speed. Every function takes an `nn.Module` (Hugging Face) or a
`prunus.OptimizedModel`, called positionally like the original."""
from prunus.eval.decode import decoder, greedy
from prunus.eval.fidelity import embedding_similarity, fidelity
from prunus.eval.passkey import passkey
from prunus.eval.perplexity import long_ppl, perplexity
from prunus.eval.run import logits
from prunus.eval.speed import speed

__all__ = ["decoder", "embedding_similarity", "fidelity", "greedy", "logits", "long_ppl", "passkey", "perplexity",
           "speed"]
