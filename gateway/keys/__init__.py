"""API keys: the `ApiKey` model and its rules (model), the keys file and its last-used
stamps (file), the in-memory store the gateway looks keys up in (store), and the
strength check of a key brought from elsewhere (strength). Nothing here knows HTTP.

May import: the base modules only.
"""
