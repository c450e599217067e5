"""The embedded benchmark: generated scenes and captions, their shards, unimodal initial weights, generated tensors."""
