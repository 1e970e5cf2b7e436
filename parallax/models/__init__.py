"""Model families (one file each, chosen by `model_type`) and their loaders."""
