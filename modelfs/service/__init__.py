"""The daemon and its tools: mounting (and the mount helper), the command line, cache administration,
publishing manifests, metrics and systemd's readiness protocol."""
