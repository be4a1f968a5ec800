"""The OpenAI application: the HTTP server, request parsing, prompts, output rendering,
admission, auth and admin."""
