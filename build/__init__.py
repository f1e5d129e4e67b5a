"""The build pipeline: one module per stage (source, export, check, publish)."""
