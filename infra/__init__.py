"""Deployment files (compose, Helm, the image) and the lock check; not part of the kaeru package."""
