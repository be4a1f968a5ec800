"""The decode worker: receives KV pages and runs continuous-batching decode (or, with
`--disaggregation-mode null`, serves requests alone, doing both phases itself)."""

from protos.contract import ROLE_COLOCATED, ROLE_DECODE

# The --disaggregation-mode values `python -m decode_worker` serves, its default first.
MODES = (ROLE_DECODE, ROLE_COLOCATED)
