"""Helpers shared by tests, demo and benchmark: a throwaway S3 server and synthetic checkpoints."""
