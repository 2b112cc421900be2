"""FUSE passthrough: complete, checked cache files handed to the kernel, which then serves them itself."""
