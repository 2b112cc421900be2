"""Fetching extents into the cache: single-flight GETs under deadlines, hedged when they stall, into
buffers from a bounded pool that gives demand reads the lead."""
