"""A node: HTTP frontend process + executor process (model shard, KV cache, engine loop)."""
