"""The decode worker: receives KV pages and runs continuous-batching decode (or, with
`--disaggregation-mode null`, serves requests alone, doing both phases itself)."""
