"""What users install: packaging, the Dockerfile, Kubernetes and mesh resources, the
compose stack and the docs."""
