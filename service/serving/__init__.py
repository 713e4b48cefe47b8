"""Tagging: the served model, micro-batching, the /tag rules, model versions and the HTTP worker supervisor; may use store and the shared modules."""
