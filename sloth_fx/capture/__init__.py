"""Capture: which modules are regions, how their training forwards reach Dynamo and the backend,
and how ``optimize`` installs and removes that on a model."""
