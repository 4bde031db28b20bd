"""The admin API: read state, drain and restore a region or an engine. Bearer token, compared in
constant time; no default token exists (see config.read_admin_token)."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from aiohttp import web
from gpufleet.serving.router.errors import HttpError
from gpufleet.serving.router.parsing import decode_json, read_body

if TYPE_CHECKING:
    from gpufleet.serving.router.gateway import Router

PREFIX = "/admin/v1"
ADMIN_BODY_BYTES = 64 * 1024  # {"region": ID} or {"engine": URL}


def authorize(request: web.Request, token: str) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest on bytes: no early exit on the first differing character. aiohttp hands over
    # bytes that are not UTF-8 as surrogates: surrogateescape turns them back into those bytes.
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, token.encode()):
        raise HttpError(
            401, "missing or wrong admin token", "authentication_error", {"WWW-Authenticate": "Bearer"}
        )


def engine_rows(router: Router) -> list[dict[str, Any]]:
    now = router.clock()
    rows = []
    for view in router.engine_views(now):
        st = router.scraper.engines[view.id]
        preempt, hit = st.rates()
        rows.append(
            {
                "engine": view.id,
                "region": view.region,
                "healthy": view.healthy,
                "error": st.error,
                "drained": view.drained,
                "breaker": view.breaker.value,
                "free_tokens": round(router.headroom_of(view, now)),
                "sampled_free_tokens": round(view.free_tokens),
                "capacity_tokens": round(view.capacity_tokens),
                "kv_usage": round(view.kv_usage, 4),
                "running": view.running,
                "waiting": view.waiting,
                "outstanding": view.outstanding,
                "preemptions_per_s": None if preempt is None else round(preempt, 3),
                "prefix_hit_rate": None if hit is None else round(hit, 4),
                "data_age_s": None if view.sampled_at is None else round(view.age(now), 3),
                "scrape_ms": round(st.scrape_seconds * 1000, 2),
            }
        )
    return rows


def state(router: Router) -> dict[str, Any]:
    now = router.clock()
    return {
        "region": router.region,
        "policy": router.policy.name,
        "drained_regions": sorted(router.drained_regions),
        "drained_engines": sorted(router.drained_engines),
        "queue": router.queued,
        "tls": None
        if router.tls is None
        else {
            "port": router.tls_port,
            "cert_file": str(router.tls.cert_file),
            "reloads": router.tls.reloads,
            "reload_error": router.tls.error,
        },
        "engines": engine_rows(router),
        "regions": [
            {**s, "breaker": router.breakers.region_state(s["region"], now).value}
            for s in router.region_summaries(now)
        ],
    }


async def _target(request: web.Request, router: Router) -> tuple[str, str]:
    raw = await read_body(request, ADMIN_BODY_BYTES, router.limits.body_timeout_s)
    try:
        body = decode_json(raw or b"{}")
    except HttpError:
        raise HttpError(400, 'body must be JSON: {"region": ID} or {"engine": URL}') from None
    if not isinstance(body, dict) or len({"region", "engine"} & body.keys()) != 1:
        raise HttpError(400, "body must name exactly one of `region` or `engine`")
    what = "region" if "region" in body else "engine"
    if not isinstance(body[what], str) or not body[what]:
        raise HttpError(400, f"`{what}` must be a non-empty string ({'a region id' if what == 'region' else 'a URL'})")
    if what == "region":
        key = body["region"]
        if key not in router.config.regions:
            raise HttpError(404, f"no region {key!r} in this fleet", "NotFoundError")
        return "region", key
    url = body["engine"].rstrip("/")
    if url not in router.scraper.engines:
        raise HttpError(404, f"no engine {url!r} in region {router.region}", "NotFoundError")
    return "engine", url


def add_routes(app: web.Application, router: Router) -> None:
    token = router.config.admin_token

    async def get_state(request: web.Request) -> web.Response:
        try:
            authorize(request, token)
        except HttpError as exc:
            return exc.response()
        return web.json_response(state(router))

    def change(drain: bool):
        async def handler(request: web.Request) -> web.Response:
            try:
                authorize(request, token)
                what, key = await _target(request, router)
            except HttpError as exc:
                return exc.response()
            target = router.drained_regions if what == "region" else router.drained_engines
            target.add(key) if drain else target.discard(key)
            return web.json_response(
                {
                    "ok": True,
                    "action": "drain" if drain else "restore",
                    what: key,
                    "router_region": router.region,
                }
            )

        return handler

    app.router.add_get(f"{PREFIX}/state", get_state)
    app.router.add_post(f"{PREFIX}/drain", change(True))
    app.router.add_post(f"{PREFIX}/restore", change(False))
