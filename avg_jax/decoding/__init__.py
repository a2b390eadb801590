"""Constrained decoding: the voken trie and the jit-compiled beam search."""
