"""Example worlds: one module of classes each, with YAML run files beside it."""
