"""Deployment beyond one host: Kubernetes manifests rendered from the one mesh config."""
