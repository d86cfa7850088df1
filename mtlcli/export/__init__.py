"""Export bundles for serving."""
