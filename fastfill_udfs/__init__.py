"""FastFill backfill pipeline: pure-Python logic (models, losses, metrics, policies, batching)
plus thin Spark/Delta and MLflow glue in separate modules."""

__version__ = "0.1.0"
