"""Turns the plain model into the shard one rank runs: expert, tensor and pipeline parallelism."""
