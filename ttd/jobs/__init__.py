"""Batch jobs: items, decoding ahead of the model, the runner, outputs (JSON lines, Parquet, COCO, masks), Ray and the HTML report."""
