"""HTTP API of tunequeue (FastAPI): the same job specs and report queries as the CLI."""
