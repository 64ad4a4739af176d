"""Data: sources → WebDataset shards (`prepare`), the shard format (`shards`), readers for training and evaluation."""
