"""fx rewrite passes: each matches one pattern and swaps it for a fused op."""
