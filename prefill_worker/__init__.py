"""The prefill worker: computes a prompt's KV pages and writes them into a decode worker."""
