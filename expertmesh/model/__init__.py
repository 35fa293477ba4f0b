"""The plain single-device MoE transformer: the reference every deployment must reproduce."""
