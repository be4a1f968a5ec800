"""The HTTP front of pdserve: OpenAI-compatible API, tokenization, routing to workers."""
