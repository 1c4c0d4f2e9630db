"""Experiment configs (default.yaml, presets/<env id>.yaml) and runnable studies."""
