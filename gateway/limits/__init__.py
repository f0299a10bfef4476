"""Per-key rate limits: token buckets in this host's shared memory (local), and the
fleet's in Redis (fleet), which the local ones stand in for while Redis is away.
Nothing here knows HTTP: the middleware that applies them is `gateway.http.ratelimit`.

May import: gateway.keys and the base modules.
"""
