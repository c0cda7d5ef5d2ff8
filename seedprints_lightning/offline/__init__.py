"""Offline work on what runs left behind: reading checkpoints, audits, identification, plots and the CLI."""
