"""What a checkpoint is made of: file versions (key + ETag) and their extents, the manifests that give
extents' hashes ahead of any byte, and the chunk index (LMDB) that says where each extent is cached."""
