"""gpufleet router serve | status | failover drain|restore.

Only Typer and the standard library at top level: aiohttp, pydantic and boto3 load inside the
command that needs them, so `gpufleet --help` and the router start fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from gpufleet.cli.common import DEFAULT_FLEET, EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_FINDINGS, fail

router_app = typer.Typer(
    help="The regional router: OpenAI-compatible, routes by KV-cache headroom.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
failover_app = typer.Typer(
    help="Drain a region (or an engine) and restore it, on every router.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _token(fleet_path: Path | None) -> str:
    """The admin token as the fleet's router settings say (env var or file), or exit 3."""
    from gpufleet.serving.router.config import ConfigError, read_admin_token

    if fleet_path is not None and fleet_path.exists():
        from gpufleet.cli.common import load_fleet_or_exit

        settings = load_fleet_or_exit(fleet_path).router
    else:
        from gpufleet.stacks.spec import RouterSettings

        settings = RouterSettings()
    try:
        return read_admin_token(settings)
    except ConfigError as exc:
        fail(str(exc), EXIT_ENVIRONMENT)


def _routers(fleet_path: Path | None, given: list[str] | None) -> list[str]:
    if given:
        return [u.rstrip("/") for u in given]
    if fleet_path is None or not fleet_path.exists():
        fail("name the routers with --router URL, or give a fleet file whose regions list endpoints.router")
    from gpufleet.cli.common import load_fleet_or_exit

    fleet = load_fleet_or_exit(fleet_path)
    urls = [r.endpoints.router.rstrip("/") for r in fleet.regions if r.endpoints.router]
    if not urls:
        fail(f"no region of {fleet_path} lists endpoints.router; name the routers with --router URL")
    return urls


def _call(url: str, token: str, body: dict | None = None, timeout: float = 5.0) -> dict[str, Any]:
    import urllib.error  # here, not at the top: urllib.request costs ~20 ms of every CLI start
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise RuntimeError(f"{exc.code}: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RuntimeError(str(getattr(exc, "reason", exc))) from None


@router_app.command("serve")
def serve(
    fleet: Path = typer.Option(DEFAULT_FLEET, "--fleet", "-f", help="fleet file"),
    region: str = typer.Option(..., "--region", help="the region this router serves (its id)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; 0.0.0.0 to serve other hosts"),
    port: int = typer.Option(8080, "--port", min=0, max=65535),
    replica: list[str] = typer.Option(
        [], "--replica", help="another router replica of this region (URL; repeatable): shares reservations"
    ),
    replicas_dns: str | None = typer.Option(
        None, "--replicas-dns", help="HOST:PORT whose A records are this region's router replicas"
    ),
    loop: str = typer.Option(
        "auto", "--loop", help="event loop: uvloop, asyncio, or auto (uvloop when installed)"
    ),
    reach: str = typer.Option(
        "regional", "--reach", help="regional (this region's engines, peers for the rest; as deployed) or "
        "global (one router over every region's engines: the baselines' best case, for comparisons)",
    ),
) -> None:
    """Serve the OpenAI API for one region until interrupted."""
    import asyncio
    import gc

    from gpufleet.cli.common import load_fleet_or_exit
    from gpufleet.serving.router.config import ConfigError, build_config
    from gpufleet.serving.router.gateway import Router

    loop_factory = _loop_factory(loop)
    if reach not in ("regional", "global"):
        fail(f"--reach must be regional or global, not {reach!r}", EXIT_BAD_INPUT)
    for url in replica:
        if not url.startswith(("http://", "https://")):
            fail(f"--replica must be an http:// or https:// URL, not {url!r}", EXIT_BAD_INPUT)
    if replicas_dns is not None and not replicas_dns.rpartition(":")[2].isdigit():
        fail(f"--replicas-dns must be HOST:PORT, not {replicas_dns!r}", EXIT_BAD_INPUT)
    spec = load_fleet_or_exit(fleet)
    try:
        config = build_config(spec, region, reach=reach)
    except ConfigError as exc:
        bad = ("no region", "lists no engines", "global reach needs")
        code = EXIT_BAD_INPUT if any(b in str(exc) for b in bad) else EXIT_ENVIRONMENT
        fail(str(exc), code)
    tls = _tls(spec.router, port)
    _raise_fd_limit()
    for peer in config.peers:
        if _cleartext(peer.router_url or ""):
            _warn(
                f"peer router {peer.key} is {peer.router_url}: plain HTTP, so the admin token sent with "
                "each summary request crosses the network in the clear; give it an https:// URL"
            )

    async def main() -> None:
        router = Router(config, replicas=replica, replicas_dns=replicas_dns)
        try:
            bound = await router.start(host, port)
        except OSError as exc:
            fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_ENVIRONMENT)
        where = f"http://{host}:{bound}"
        if tls is not None:
            tls_port = spec.router.tls_port
            try:
                where += f" and https://{host}:{await router.start_tls(tls, host, tls_port)}"
            except OSError as exc:
                await router.close()
                fail(f"cannot listen on {host}:{tls_port} (router.tls_port): {exc.strerror or exc}", EXIT_ENVIRONMENT)
        print(
            f"router for {region if reach == 'regional' else 'every region (global reach)'} listening on {where} "
            f"({len(config.region.engines)} engines, {len(config.peers)} peers, "
            f"at most {router.limits.max_connections} client connections)",
            flush=True,
        )
        # What start-up loaded (modules, config, catalog) lives as long as the process: kept out of
        # the collector's full passes, which otherwise walk it again and again under load. Each
        # request allocates a few hundred short-lived containers, nearly all freed by reference
        # counting: a young-generation pass every 20,000 allocations instead of 700 costs about 8%
        # less CPU per streamed request (docs/router.md, Benchmark).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        try:
            await asyncio.Event().wait()
        finally:
            await router.close()

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _loop_factory(name: str):
    """The event loop `router serve` runs on. uvloop (libuv, what uvicorn uses) carries each
    relayed SSE event for less CPU than asyncio's selector loop (docs/router.md, Benchmark)."""
    if name not in ("auto", "uvloop", "asyncio"):
        fail(f"--loop must be uvloop, asyncio or auto, not {name!r}", EXIT_BAD_INPUT)
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            fail("--loop uvloop: uvloop is not installed (pip install uvloop)", EXIT_ENVIRONMENT)
        return None
    return uvloop.new_event_loop


def _raise_fd_limit(ceiling: int = 65536) -> None:
    """Raise the soft file-descriptor limit to the hard one (at most `ceiling`), as servers do: the
    router's connection cap is derived from it (serving/router/limits.py)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; the cap follows it


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _cleartext(url: str) -> bool:
    """A plain-http URL to another host (loopback is this machine: nothing crosses a network)."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _tls(settings, port: int):
    """The router's CertReloader when the fleet asks for HTTPS (router.tls_cert_file and
    tls_key_file), else None; exits 2 on settings that do not go together, 3 on files that cannot
    be read or used."""
    if not settings.tls_cert_file and not settings.tls_key_file:
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        fail(
            "router.tls_cert_file and router.tls_key_file go together: set both (HTTPS on "
            "router.tls_port) or neither",
            EXIT_BAD_INPUT,
        )
    if settings.tls_port == port:
        fail(f"router.tls_port {settings.tls_port} is also --port: HTTPS needs a port of its own", EXIT_BAD_INPUT)
    from gpufleet.serving.router.tls import CertReloader, TlsError

    try:
        return CertReloader(settings.tls_cert_file, settings.tls_key_file, on_event=_warn)
    except TlsError as exc:
        fail(str(exc), EXIT_ENVIRONMENT)


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _render(states: list[tuple[str, dict | str]]):
    from rich.table import Table

    tables = []
    for url, state in states:
        if isinstance(state, str):
            t = Table(title=f"{url}: unreachable ({state})", title_style="bold red")
            tables.append(t)
            continue
        drained_regions = set(state["drained_regions"])
        title = f"region {state['region']}  ({url}, policy {state['policy']}, queue {state['queue']})"
        t = Table(title=title, title_justify="left")
        for col in (
            "engine",
            "free KV tokens",
            "KV usage",
            "running",
            "waiting",
            "preempt/s",
            "prefix hit",
            "data age s",
            "breaker",
            "drained",
            "up",
        ):
            t.add_column(col, justify="left" if col == "engine" else "right")
        for e in state["engines"]:
            t.add_row(
                e["engine"],
                f"{e['free_tokens']:,}",
                f"{e['kv_usage']:.0%}",
                str(e["running"]),
                str(e["waiting"]),
                _fmt(e["preemptions_per_s"], ".2f"),
                _fmt(e["prefix_hit_rate"], ".0%"),
                _fmt(e["data_age_s"], ".2f"),
                e["breaker"],
                "yes" if e["drained"] or state["region"] in drained_regions else "",
                "yes" if e["healthy"] else f"no: {e['error'] or ''}"[:40],
            )
        for r in state["regions"]:
            t.add_row(
                f"[region] {r['region']}",
                f"{round(r['free_tokens']):,}",
                "",
                str(r.get("running", "")),
                str(r.get("waiting", "")),
                "",
                "",
                _fmt(r.get("data_age_s"), ".2f"),
                r.get("breaker", ""),
                "yes" if r.get("drained") or r["region"] in drained_regions else "",
                f"{r.get('healthy_engines', 0)}/{r.get('engines', '?')} engines",
            )
        tables.append(t)
    return tables


@failover_app.command("drain")
def drain(
    region: str = typer.Argument(..., help="region id to drain"),
    fleet: Path = typer.Option(DEFAULT_FLEET, "--fleet", "-f"),
    router: list[str] | None = typer.Option(
        None, "--router", help="router URL (repeat); default: the fleet's"
    ),
    engine: str | None = typer.Option(
        None, "--engine", help="drain only this engine URL, on REGION's router"
    ),
    dns: bool = typer.Option(False, "--dns", help="also take the region out of Route53 DNS"),
) -> None:
    """No new request goes to REGION; what it is serving finishes."""
    _change("drain", region, fleet, router, engine, dns)


@failover_app.command("restore")
def restore(
    region: str = typer.Argument(..., help="region id to restore"),
    fleet: Path = typer.Option(DEFAULT_FLEET, "--fleet", "-f"),
    router: list[str] | None = typer.Option(
        None, "--router", help="router URL (repeat); default: the fleet's"
    ),
    engine: str | None = typer.Option(None, "--engine", help="restore only this engine URL"),
    dns: bool = typer.Option(False, "--dns", help="also put the region back into Route53 DNS"),
) -> None:
    """Send traffic to REGION again."""
    _change("restore", region, fleet, router, engine, dns)


def _change(
    action: str, region: str, fleet: Path, routers: list[str] | None, engine: str | None, dns: bool
) -> None:
    from gpufleet.cli.common import console

    out = console()
    token = _token(fleet)
    urls = _routers(fleet, routers)
    body = {"engine": engine} if engine else {"region": region}
    failures = 0
    for url in urls:
        try:
            _call(f"{url}/admin/v1/{action}", token, body)
            out.print(f"{url}: {action} {engine or region}: ok")
        except RuntimeError as exc:
            if engine and str(exc).startswith("404"):
                continue  # the engine belongs to another router's region
            failures += 1
            out.print(f"{url}: {action} {engine or region}: FAILED ({exc})")
    if dns:
        from gpufleet.cli.common import load_fleet_or_exit
        from gpufleet.stacks.dns_failover import DnsFailoverError, set_region_in_dns

        spec = load_fleet_or_exit(fleet)
        try:
            # boto3 itself honours AWS_ENDPOINT_URL(_ROUTE53), e.g. for moto server.
            change = set_region_in_dns(spec, region, in_dns=action == "restore")
        except KeyError as exc:
            fail(str(exc.args[0]))
        except DnsFailoverError as exc:
            fail(str(exc), EXIT_ENVIRONMENT)
        state = "already " if not change.changed else ""
        out.print(
            f"dns: {change.record} {region}: health check {change.health_check_id} "
            f"{state}{'inverted (out of DNS)' if change.inverted else 'normal (in DNS)'}"
        )
    if failures:
        raise typer.Exit(EXIT_FINDINGS)


def register(app: typer.Typer) -> None:
    app.add_typer(router_app, name="router")
    app.add_typer(failover_app, name="failover")

    @app.command("status")
    def status(
        fleet: Path | None = typer.Option(
            None, "--fleet", "-f", help="fleet file (routers and token settings)"
        ),
        router: list[str] | None = typer.Option(None, "--router", help="router URL (repeat)"),
        watch: bool = typer.Option(False, "--watch", "-w", help="refresh until Ctrl-C"),
        interval: float = typer.Option(2.0, "--interval", min=0.2, help="seconds between refreshes"),
        as_json: bool = typer.Option(False, "--json", help="print the routers' state as JSON"),
    ) -> None:
        """KV headroom, batch and health per region and engine, from every router's admin API."""
        if fleet is None and DEFAULT_FLEET.exists() and not router:
            fleet = DEFAULT_FLEET
        token = _token(fleet)
        urls = _routers(fleet, router)

        def gather() -> list[tuple[str, dict | str]]:
            out: list[tuple[str, dict | str]] = []
            for url in urls:
                try:
                    out.append((url, _call(f"{url}/admin/v1/state", token)))
                except RuntimeError as exc:
                    out.append((url, str(exc)))
            return out

        if as_json:
            states = gather()
            print(json.dumps({u: s if isinstance(s, dict) else {"error": s} for u, s in states}, indent=2))
            raise typer.Exit(EXIT_FINDINGS if any(isinstance(s, str) for _, s in states) else 0)
        from gpufleet.cli.common import console
        from rich.console import Group

        con = console()
        if not watch:
            states = gather()
            con.print(Group(*_render(states)))
            raise typer.Exit(EXIT_FINDINGS if any(isinstance(s, str) for _, s in states) else 0)
        from rich.live import Live

        try:
            with Live(Group(*_render(gather())), console=con, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(Group(*_render(gather())), refresh=True)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
