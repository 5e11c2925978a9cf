"""Datasets inside a worker: references, local files, examples with the prompt applied, the synthetic datasets."""
