"""One module per pipeline stage: a plain `run` function plus its Prefect task."""
