"""One node's compute: sequences, paged KV, continuous batching, model runner, sampler."""
