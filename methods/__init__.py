"""KV-cache compression methods, their registry, the compressed cache and evaluation."""
