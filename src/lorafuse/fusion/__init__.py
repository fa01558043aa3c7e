"""Data-driven fusion: LoraHub (few-shot, gradient-free weights per adapter) and an input-routed mixture."""
