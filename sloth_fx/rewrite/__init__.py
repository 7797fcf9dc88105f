"""The rewrite engine: canonical graphs, patterns, the pass loop, graph edits and verification."""
