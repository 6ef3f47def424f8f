"""ml_collections config files, one per family: `get_config("<preset>")`."""
