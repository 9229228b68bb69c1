"""Example tasks and MLTask manifests (shipped as `tether.examples`)."""
