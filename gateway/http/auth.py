"""What an API key admits: the key check on /v1, its browser policy, and its platforms.

Every way a key is refused is here, each counted in `cafe_auth_failures_total` by its
reason. The middleware refuses a request with no key (`missing`), one not in the keys
file (`unknown`), disabled (`disabled`) or past its `expires_at` (`expired`), and a key
used against its browser policy (`not_browser_key`, `origin`, `browser_read`). A record
of a platform the key may not write is refused record by record, since the platform is
in the body: ingest asks the key (`ApiKey.may_write`) of each record and counts
`platform` once per request. The keys themselves (model, file, in-memory store) are
`gateway.keys`.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import (
    InvalidApiKey,
    MissingApiKey,
    NotABrowserKey,
    OriginNotAllowed,
    WriteOnlyKey,
)
from gateway.http.context import RequestContext
from gateway.http.metrics import HttpMetrics
from gateway.http.state import CONTEXT
from gateway.keys.model import ApiKey
from gateway.keys.store import KeyStore

# Under /v1 every route needs a key except these, which clients and tooling fetch freely.
_PUBLIC_PREFIXES = ("/v1/schema/", "/v1/openapi.json")


def api_key_middleware(
    keys: KeyStore, metrics: HttpMetrics, ingest_paths: frozenset[str]
) -> Middleware:
    """A middleware that admits /v1 requests carrying an enabled key in `x-api-key`.

    On `ingest_paths` a browser key may come as `?api_key=` instead. A request with an
    `Origin` (from a web page) is admitted only if the key lists that origin. Refusals
    are counted by reason; an unknown key, a disabled one and an expired one get the same
    answer. The id of each key admitted goes into `keys.used`, for "last used".
    """

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/") and not request.path.startswith(_PUBLIC_PREFIXES):
            sends_records = request.method == "POST" and request.path in ingest_paths
            check_key(request, request[CONTEXT], keys, metrics, sends_records=sends_records)
        return await handler(request)

    return check_api_key


def check_key(
    request: web.BaseRequest,
    context: RequestContext,
    keys: KeyStore,
    metrics: HttpMetrics,
    *,
    sends_records: bool,
) -> ApiKey:
    """The key a keyed request is admitted with, also set as `context.key`; raise the
    refusal otherwise. `sends_records`: a POST of records, where a browser key may come
    as `?api_key=`."""
    supplied = request.headers.get("x-api-key")
    in_query = not supplied and sends_records and "api_key" in request.query
    if in_query:
        supplied = request.query["api_key"]
    if not supplied:
        metrics.auth_failures.labels("missing").inc()
        raise MissingApiKey("send an API key in the x-api-key header")
    key = keys.lookup(supplied)
    if key is None or (state := key.state()) != "enabled":
        metrics.auth_failures.labels("unknown" if key is None else state).inc()
        raise InvalidApiKey("the API key is unknown or disabled")
    # Set before the browser checks, so that a refusal is logged with the key's id and its
    # answer carries CORS headers only for the key's own origins.
    context.key = key
    _check_browser_use(key, request, metrics, sends_records=sends_records, in_query=in_query)
    keys.used.add(key.id)
    return key


def _check_browser_use(
    key: ApiKey,
    request: web.BaseRequest,
    metrics: HttpMetrics,
    *,
    sends_records: bool,
    in_query: bool,
) -> None:
    origin = request.headers.get("Origin")
    if in_query and not key.browser:
        metrics.auth_failures.labels("not_browser_key").inc()
        raise NotABrowserKey("only a browser key may be sent as ?api_key=")
    if in_query and origin is None:
        metrics.auth_failures.labels("origin").inc()
        raise OriginNotAllowed("?api_key= is accepted only from a web page (no Origin sent)")
    if origin is not None and origin not in key.origins:
        metrics.auth_failures.labels("origin").inc()
        raise OriginNotAllowed(f"this API key may not be used from origin {origin!r}")
    if key.browser and not sends_records:
        metrics.auth_failures.labels("browser_read").inc()
        raise WriteOnlyKey("a browser key may only send records")
