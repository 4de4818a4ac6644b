"""The pipeline's stages, one module each (listed per method in dpwave/train/pipeline.py: PIPELINES)."""
