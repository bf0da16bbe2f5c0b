"""Image-text data: the synthetic world, jsonl + folder datasets, webdataset shards."""
