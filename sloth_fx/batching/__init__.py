"""Batching: padded batches run padding-free, packed rows run attention per sequence."""
