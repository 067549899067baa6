"""Deployment artefacts: the Docker image and the Kubernetes manifests."""
