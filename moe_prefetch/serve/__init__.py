"""`moe-prefetch serve`: one offloaded model behind an OpenAI-compatible HTTP endpoint, on the
standard library's http.server. Bottom-up: `schema` (the OpenAI wire format), `text` (token ids
to streamed text, stop sequences), `queue` (one generation at a time, a bounded line),
`metrics` (Prometheus text), `engine` (the model, its prompts, generation as `run` does it),
`routes` (the HTTP handler), `server` (listening, shutting down).

Layer: above the public face (`moe_prefetch.load`) and everything below it; never imports cli.
"""
