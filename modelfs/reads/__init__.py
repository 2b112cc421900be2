"""Serving a READ the daemon answers: the extents it spans (from the cache, the daemon's memory or a
fetch), stream detection and read-ahead, whole-file prefetch jobs and the push into the page cache."""
