"""How a prompt becomes token ids and prefix-cache block keys.

A leaf shared by the engine (which caches blocks under these keys) and the gateway's router
(which predicts them to route for cache hits), so both compute them one way. It imports only
`tokenizers` and jinja2: no engine, no network, no wire format.
"""
