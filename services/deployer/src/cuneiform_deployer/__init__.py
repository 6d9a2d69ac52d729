"""Cuneiform deployer: model registry, routing, canary and A/B rollout on live reward."""
