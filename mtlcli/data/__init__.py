"""Data: schema.json, preprocessing with polars, and tensors batched by index."""
