"""Corpus -> clean documents -> deduplicated -> split -> token shards (`llmos prepare`)."""
