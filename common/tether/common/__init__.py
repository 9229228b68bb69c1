"""Pieces shared by every component: manifests, errors, configuration, the admin client."""
