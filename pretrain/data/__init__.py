"""The data pipeline: corpus reading, tokenizers, the examples cache, packing into blocks, sentence pairs, streaming,
and the Lightning data module that ties them together."""
