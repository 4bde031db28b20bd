"""Readiness (/ready, for Route53), the scale signal (/scale, for KEDA) and HTTPS with certificate
reload, through real sockets; the /scale arithmetic with hand-computed numbers."""

from __future__ import annotations

import asyncio
import datetime
import math
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from gpufleet.serving.engine.model import EngineConfig
from gpufleet.serving.engine.server import EmulatorServer
from gpufleet.serving.router.config import build_config
from gpufleet.serving.router.gateway import Router
from gpufleet.serving.router.scale import TARGET_FILL, ScaleInputs, UnmetDemand, desired_engines
from gpufleet.serving.router.signals import Sample
from gpufleet.serving.router.tls import CertReloader, TlsError
from gpufleet.stacks.fleetfile import load_fleet

from .harness import MODEL, TOKEN, RegionSpec, ask, start_fleet

AWS = "aws-us-east-1"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ENV = {"GPUFLEET_ADMIN_TOKEN": TOKEN}


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- /scale arithmetic ---------------------------------------------------------------------------


def inputs(kv=0.0, waiting=0.0, queued=0.0, spilled=0.0, refused=0.0, cap: float | None = 1536.0):
    return ScaleInputs(kv, waiting, queued, spilled, refused, cap)


def test_desired_engines_arithmetic():
    assert TARGET_FILL == 0.75  # one engine of 96 blocks x 16 = 1536 tokens holds 1152 at the target
    assert desired_engines(inputs()) == 0  # idle
    assert desired_engines(inputs(kv=1000)) == 1  # 1000 / 1152
    assert desired_engines(inputs(kv=2304)) == 2  # exactly 2 x 1152: no extra engine for float noise
    assert desired_engines(inputs(kv=2305)) == 3
    # 2000 in use + 2 waiting x 512 + 300 queued = 3324; / 1152 = 2.89 -> 3
    assert desired_engines(inputs(kv=2000, waiting=1024, queued=300)) == 3
    # spilled 600 + refused 200 with nothing in use: 800 / 1152 -> 1 (at least one while unmet)
    assert desired_engines(inputs(spilled=600, refused=200)) == 1
    assert desired_engines(inputs(queued=10)) == 1
    # 70B-sized engines: 4 x 1152 + 1 = 4609 tokens in 1536-token engines -> 5
    assert desired_engines(inputs(kv=4609)) == 5
    # unknown engine size: one engine while there is demand, none when idle
    assert desired_engines(inputs(kv=5000, cap=None)) == 1
    assert desired_engines(inputs(cap=None)) == 0
    assert inputs(kv=1, waiting=2, queued=3, spilled=4, refused=5).demand_tokens == 15


def test_unmet_demand_keeps_peaks_for_a_minute():
    u = UnmetDemand(window_s=60, slot_s=1)
    a, b = object(), object()
    u.spill_started(a, 400, 100.2)
    u.spill_started(b, 300, 100.5)  # 700 in flight at once
    assert u.peaks(100.6) == (700, 0)
    u.spill_ended(a, 101.1)  # slot 101 starts with both in flight
    u.spill_ended(b, 103.0)  # slot 103 starts with b (300) in flight
    u.spill_ended(b, 103.1)  # unknown key: ignored
    assert u.spilling_tokens == 0
    assert u.peaks(160.9) == (700, 0)  # slot 100 is within the last 60 s of slot 160
    assert u.peaks(161.0) == (700, 0)  # slot 101
    assert u.peaks(162.0) == (300, 0)  # slot 103
    assert u.peaks(164.0) == (0, 0)
    # Refusals: the most refused in one second, not the sum over the minute (clients retry).
    for t in (200.1, 200.7, 200.9):
        u.refused(200, t)
    u.refused(500, 201.5)
    assert u.peaks(202) == (0, 600)
    assert u.peaks(260.99) == (0, 600)
    assert u.peaks(261.0) == (0, 500)
    assert u.peaks(262.0) == (0, 0)
    # A long spill still in flight counts, whatever the window.
    c = object()
    u.spill_started(c, 250, 300.0)
    assert u.peaks(1000.0) == (250, 0)
    assert len(u._slots) <= 62  # bounded: old slots dropped as new ones come


def _one_region_fleet(tmp_path: Path, router: dict | None = None, engines=("http://127.0.0.1:9",)) -> Path:
    doc = {
        "fleet": "scale",
        "models": [{"name": MODEL, "catalog": MODEL, "max_model_len": 4096}],
        "regions": [
            {
                "cloud": "aws",
                "region": "us-east-1",
                "gpu": "H100-80GB",
                "nodes": {"min": 0, "max": 2},
                "endpoints": {"engines": list(engines)},
            }
        ],
        **({"router": router} if router else {}),
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _sample(blocks: int, usage: float, waiting: int, at: float) -> Sample:
    cap = (blocks - 1) * 16  # block 0 is the null block
    return Sample(
        kv_usage=usage, num_gpu_blocks=blocks, block_size=16, free_tokens=(1 - usage) * cap, running=1,
        waiting=waiting, preemptions_total=0, prefix_queries_total=0, prefix_hits_total=0,
        models=frozenset({MODEL}), taken_at=at,
    )  # fmt: skip


def test_scale_report_from_router_state(tmp_path):
    from gpufleet.serving.router.scale import scale_report
    from gpufleet.serving.sizing import fit_engine
    from gpufleet.stacks import catalog

    urls = ("http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000")
    fleet = load_fleet(_one_region_fleet(tmp_path, engines=urls))
    config = build_config(fleet, AWS, ENV)
    now = 1000.0
    router = Router(config, clock=lambda: now)

    # No engine has reported: one engine's size comes from the fleet's sizing (the launcher's).
    gpu = catalog.gpu("H100-80GB")
    plan = fit_engine(fleet.models[0].shape, gpu.memory_bytes, gpu.name, max_model_len=4096)
    assert config.engine_tokens_estimate == plan.kv_tokens > 100_000
    idle = scale_report(router, now)
    assert idle["desired_engines"] == 0 and idle["demand_tokens"] == 0
    assert idle["capacity_source"] == "fleet sizing" and idle["capacity_per_engine_tokens"] == plan.kv_tokens
    router.queued, router.queued_tokens = 1, 10
    assert scale_report(router, now)["desired_engines"] == 1  # a request waits: at least one engine

    # Engines report 97 blocks, 96 usable x 16 = 1536 tokens: 1152 at the target fill.
    one, two, three = (router.scraper.engines[u] for u in urls)
    one.record(_sample(97, 0.5, waiting=1, at=now - 0.5))  # 768 in use, 1 waiting = 512
    two.record(_sample(97, 0.25, waiting=0, at=now - 0.5))  # 384 in use
    three.record(_sample(97, 0.9, waiting=4, at=now - 10))  # stale: its size counts, its load not
    router.queued, router.queued_tokens = 1, 300
    router.unmet.spill_started(object(), 600, now - 1)
    router.unmet.refused(200, now - 1.5)
    report = scale_report(router, now)
    # 768 + 384 + 512 + 300 + 600 + 200 = 2764 tokens; 2764 / 1152 = 2.4 -> 3 engines
    assert report == {
        "region": AWS,
        "desired_engines": 3,
        "demand_tokens": 2764,
        "kv_in_use_tokens": 1152,
        "waiting_tokens": 512,
        "queued_tokens": 300,
        "spilled_tokens": 600,
        "refused_tokens": 200,
        "peer_unmet_tokens": 0,
        "capacity_per_engine_tokens": 1536,
        "target_fill": 0.75,
        "window_s": 60.0,
        "drained": False,
        "engines": 3,
        "engines_reporting": 2,
        "queued_requests": 1,
        "capacity_source": "engines",
    }
    # The refusal leaves the window after a minute: 2564 / 1152 = 2.2 -> still 3; the spill is in flight.
    now += 61
    one.record(_sample(97, 0.5, waiting=1, at=now))
    two.record(_sample(97, 0.25, waiting=0, at=now))
    assert scale_report(router, now)["refused_tokens"] == 0


def test_an_idle_region_takes_a_share_of_what_its_peers_refused(tmp_path):
    """DNS does not send clients to a region at zero engines; it warms up when its peers run out of
    room: their summaries carry what they refused, split evenly over the regions."""
    from gpufleet.serving.router.scale import scale_report

    fleet = load_fleet(_one_region_fleet(tmp_path, engines=("http://10.0.0.1:8000",)))
    now = 1000.0
    router = Router(build_config(fleet, AWS, ENV), clock=lambda: now)
    assert scale_report(router, now)["desired_engines"] == 0
    router.peer_summaries["peer-a"] = (now - 1, {"unmet_tokens": 9000.0})
    router.peer_summaries["peer-b"] = (now - 1, {"unmet_tokens": 0.0})
    router.peer_summaries["peer-old"] = (now - 60, {"unmet_tokens": 50_000.0})  # stale: ignored
    report = scale_report(router, now)
    assert report["peer_unmet_tokens"] == 3000  # 9000 over 3 regions (this one and two fresh peers)
    assert report["desired_engines"] == 1
    router.drained_regions.add(AWS)  # a drained region does not wake for its peers
    assert scale_report(router, now)["peer_unmet_tokens"] == 0
    # The summary publishes the refused peak for the peers.
    router.drained_regions.discard(AWS)
    router.unmet.refused(700, now)
    assert router.local_summary(now)["unmet_tokens"] == 700


# ---- /ready and /scale over sockets --------------------------------------------------------------


def test_ready_and_scale_endpoints(tmp_path):
    async def main():
        one = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=2, blocks=96),)
        bed = await start_fleet(tmp_path, one, time_scale=20, router={"queue_wait_s": 0.2})
        url, s = bed[AWS].url, bed.session
        try:
            async with s.get(url + "/ready") as r:
                assert r.status == 200
                assert await r.json() == {"ready": True, "region": AWS, "engines_ready": 2, "engines": 2}

            # /scale wants the admin token, as the admin API does.
            async with s.get(url + "/scale") as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                assert (await r.json())["error"]["type"] == "authentication_error"
            async with s.get(url + "/scale", headers={"Authorization": "Bearer " + "x" * len(TOKEN)}) as r:
                assert r.status == 401
            async with s.get(url + "/scale", headers=ADMIN) as r:
                assert r.status == 200
                idle = await r.json()
            assert idle["desired_engines"] == 0 and idle["demand_tokens"] == 0
            # 96 blocks, less the null block
            assert (idle["capacity_per_engine_tokens"], idle["capacity_source"]) == (95 * 16, "engines")

            # A request that fits no engine of 1520 tokens can never be served here: 400, not a 429
            # that would have the client retry (and not demand for more engines of the same size).
            never = await ask(s, url, max_tokens=1600, content="x" * 40)  # need 10 + 1600 tokens
            assert never.status == 400 and "more than any engine" in never.error
            # Two long answers hold most of each engine; one that would fit an empty engine finds no
            # room now: refused (429), and /scale asks for engines for it.
            hold = [asyncio.create_task(ask(s, url, max_tokens=1400, content=f"hold {i}")) for i in range(2)]
            until = time.monotonic() + 5
            while sum(e.engine.stats().num_running for e in bed[AWS].engines) < 2:
                assert time.monotonic() < until, "the long answers did not start"
                await asyncio.sleep(0.01)
            big = await ask(s, url, max_tokens=1000, content="x" * 40)  # need 10 + 1000 tokens
            assert big.status == 429
            async with s.get(url + "/scale", headers=ADMIN) as r:
                busy = await r.json()
            assert busy["refused_tokens"] == 1010
            assert busy["demand_tokens"] >= 1010 + busy["kv_in_use_tokens"]
            assert busy["desired_engines"] == math.ceil(busy["demand_tokens"] / (1520 * 0.75)) >= 1
            assert all(a.complete for a in await asyncio.gather(*hold))

            # Drained: not ready (503, OpenAI-style), so DNS stops sending clients here.
            async with s.post(url + "/admin/v1/drain", json={"region": AWS}, headers=ADMIN) as r:
                assert r.status == 200
            async with s.get(url + "/ready") as r:
                body = await r.json()
                assert r.status == 503
            assert body["error"]["type"] == "service_unavailable" and body["error"]["code"] == 503
            assert "drained" in body["error"]["message"] and body["ready"] is False
            async with s.post(url + "/admin/v1/restore", json={"region": AWS}, headers=ADMIN) as r:
                assert r.status == 200
            async with s.get(url + "/ready") as r:
                assert r.status == 200

            # One engine drained: ready on the other.
            e0, e1 = bed[AWS].engines
            async with s.post(url + "/admin/v1/drain", json={"engine": e0.url}, headers=ADMIN) as r:
                assert r.status == 200
            async with s.get(url + "/ready") as r:
                assert r.status == 200 and (await r.json())["engines_ready"] == 1

            # Every engine gone: 503 saying why; /health (liveness) still answers 200.
            for e in bed[AWS].engines:
                await e.set_faults({"refuse_connections": True})
            until = time.monotonic() + 5
            while True:
                async with s.get(url + "/ready") as r:
                    body = await r.json()
                    if r.status == 503:
                        break
                assert time.monotonic() < until, body
                await asyncio.sleep(0.05)
            assert body["engines_ready"] == 0
            # e1 down; e0 drained, then down too once its failed scrape shows
            assert body["error"]["message"] in (
                f"no engine of region {AWS} is up (1 down, 1 drained)",
                f"no engine of region {AWS} is up (2 down)",
            ), body
            async with s.get(url + "/health") as r:
                assert r.status == 200
        finally:
            await bed.close()

    run(main())


# ---- TLS -----------------------------------------------------------------------------------------


class Ca:
    """A throwaway certificate authority (self-signed) that issues server certificates."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpufleet test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for localhost and 127.0.0.1, named `cn`."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write(path: Path, data: bytes) -> None:
    """Replace a file the way a Secret volume does: a new file swapped in (a new inode)."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def _served_cn(port: int) -> str:
    """The common name of the certificate a new connection to 127.0.0.1:port gets."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_https_beside_http_and_the_certificate_reloads_when_its_files_change(tmp_path):
    async def main():
        ca = Ca()
        (tmp_path / "ca.pem").write_bytes(ca.pem())
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        pem, kpem = ca.issue("router-a")
        _write(cert, pem)
        _write(key, kpem)
        events: list[str] = []
        tls = CertReloader(cert, key, interval_s=0.05, on_event=events.append)
        one = (RegionSpec("aws", "us-east-1", "H100-80GB", engines=1, blocks=96),)
        bed = await start_fleet(tmp_path, one, time_scale=20)
        router, s = bed[AWS].router, bed.session
        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        try:
            port = await router.start_tls(tls, "127.0.0.1", 0)
            for base in (f"https://localhost:{port}", f"https://127.0.0.1:{port}"):
                async with s.get(base + "/ready", ssl=trusted) as r:
                    assert r.status == 200 and (await r.json())["ready"] is True
            async with s.get(f"https://localhost:{port}/scale", ssl=trusted, headers=ADMIN) as r:
                assert r.status == 200 and (await r.json())["desired_engines"] == 0
            async with s.get(bed[AWS].url + "/ready") as r:  # plain HTTP still served
                assert r.status == 200
            assert await _served_cn(port) == "router-a"
            # aiohttp verifies by default: a client that does not trust the test CA is refused.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with s.get(f"https://localhost:{port}/ready") as r:
                    pass

            async def reloaded(n: int) -> None:
                until = time.monotonic() + 5
                while tls.reloads < n:
                    assert time.monotonic() < until, events
                    await asyncio.sleep(0.02)

            # Renewal: new files swapped in; new connections get the new certificate.
            pem_b, kpem_b = ca.issue("router-b")
            _write(key, kpem_b)
            _write(cert, pem_b)
            await reloaded(1)
            assert await _served_cn(port) == "router-b"
            async with s.get(f"https://localhost:{port}/ready", ssl=trusted) as r:
                assert r.status == 200

            # A certificate whose key has not arrived yet: reported, the old pair kept and served.
            pem_c, kpem_c = ca.issue("router-c")
            _write(cert, pem_c)
            until = time.monotonic() + 5
            while tls.error is None:
                assert time.monotonic() < until, events
                await asyncio.sleep(0.02)
            assert "KEY_VALUES_MISMATCH" in tls.error or "mismatch" in tls.error.lower(), tls.error
            assert await _served_cn(port) == "router-b"
            async with s.get(f"https://localhost:{port}/ready", ssl=trusted) as r:
                assert r.status == 200
            _write(key, kpem_c)  # the key follows: now it loads
            await reloaded(2)
            assert await _served_cn(port) == "router-c" and tls.error is None
            # Rewritten in place (same inode), e.g. by hand: noticed too.
            pem_d, kpem_d = ca.issue("router-d")
            with open(key, "r+b") as f:
                f.truncate(0)
                f.write(kpem_d)
            with open(cert, "r+b") as f:
                f.truncate(0)
                f.write(pem_d)
            await reloaded(3)
            assert await _served_cn(port) == "router-d"
            assert sum("reloaded" in e for e in events) == 3 and sum("failed" in e for e in events) == 1

            async with s.get(bed[AWS].url + "/admin/v1/state", headers=ADMIN) as r:
                state = (await r.json())["tls"]
            assert state == {"port": port, "cert_file": str(cert), "reloads": 3, "reload_error": None}
        finally:
            await bed.close()

    run(main())


def test_certificate_problems_at_start_are_clean_errors(tmp_path, monkeypatch):
    from gpufleet.cli.app import app
    from typer.testing import CliRunner

    monkeypatch.setenv("GPUFLEET_ADMIN_TOKEN", TOKEN)
    cli = CliRunner()
    ca = Ca()
    pem, kpem = ca.issue("x")
    (tmp_path / "good.crt").write_bytes(pem)
    (tmp_path / "good.key").write_bytes(kpem)
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    _, other_key = ca.issue("y")
    (tmp_path / "other.key").write_bytes(other_key)

    def serve(**tls):
        fleet = _one_region_fleet(tmp_path, router={k: str(tmp_path / v) for k, v in tls.items()})
        return cli.invoke(app, ["router", "serve", "--fleet", str(fleet), "--region", AWS, "--port", "0"])

    cases = [
        ({"tls_cert_file": "missing.crt", "tls_key_file": "good.key"}, 3, "cannot read the TLS certificate file"),
        ({"tls_cert_file": "good.crt", "tls_key_file": "missing.key"}, 3, "cannot read the TLS key file"),
        ({"tls_cert_file": "junk.crt", "tls_key_file": "good.key"}, 3, "the certificate is not PEM"),
        ({"tls_cert_file": "good.crt", "tls_key_file": "other.key"}, 3, "cannot be used"),
        ({"tls_cert_file": "good.crt"}, 2, "go together"),
    ]
    for tls, code, words in cases:
        res = serve(**tls)
        assert res.exit_code == code, (tls, res.output)
        assert words in res.output and "Traceback" not in res.output, res.output
        assert isinstance(res.exception, SystemExit), res.exception
    with pytest.raises(TlsError, match="cannot read the TLS certificate file"):
        CertReloader(tmp_path / "missing.crt", tmp_path / "good.key")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_router_serve_over_https_and_peers_verified_by_the_trust_store(tmp_path):
    """`gpufleet router serve` (a real process) serves HTTP on --port and HTTPS on router.tls_port.
    Its peer is an https:// router with a certificate from a test CA: the process trusts that CA
    (SSL_CERT_FILE, OpenSSL's default trust store) and reads the peer's summary; the peer's router
    does not, and never reads the process's summary (aiohttp verifies, and nothing turns it off).
    Drained, the process forwards a request to that peer over the same verified HTTPS."""

    async def main():
        ca = Ca()
        (tmp_path / "ca.pem").write_bytes(ca.pem())
        for name in ("a", "b"):
            pem, kpem = ca.issue(f"router-{name}")
            (tmp_path / f"{name}.crt").write_bytes(pem)
            (tmp_path / f"{name}.key").write_bytes(kpem)
        engines = {}
        for key in ("a", "b"):
            e = EmulatorServer(
                EngineConfig(model=MODEL, gpu="H100-80GB", num_gpu_blocks=96, max_model_len=4096,
                             served_model_name=MODEL),
                time_scale=20, admin_token=TOKEN,
            )  # fmt: skip
            await e.start("127.0.0.1", 0)
            engines[key] = e
        a_http, a_https = _free_port(), _free_port()
        b_sock = socket.create_server(("127.0.0.1", 0))
        b_tls_sock = socket.create_server(("127.0.0.1", 0))
        b_https = b_tls_sock.getsockname()[1]
        settings = {
            "scrape_interval_s": 0.1, "scrape_timeout_s": 0.5, "stale_after_s": 1.0,
            "tls_cert_file": str(tmp_path / "a.crt"), "tls_key_file": str(tmp_path / "a.key"),
            "tls_port": a_https,
        }  # fmt: skip
        doc = {
            "fleet": "tls",
            "models": [{"name": MODEL, "catalog": MODEL, "max_model_len": 4096}],
            "regions": [
                {
                    "cloud": "aws", "region": "us-east-1", "gpu": "H100-80GB", "nodes": {"max": 1},
                    "endpoints": {"engines": [engines["a"].url], "router": f"https://localhost:{a_https}"},
                },
                {
                    "cloud": "aws", "region": "us-west-2", "gpu": "H100-80GB", "nodes": {"max": 1},
                    "endpoints": {"engines": [engines["b"].url], "router": f"https://localhost:{b_https}"},
                },
            ],  # fmt: skip
            "router": settings,
        }
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(yaml.safe_dump(doc, sort_keys=False))
        peer = Router(build_config(load_fleet(fleet), "aws-us-west-2", ENV))
        await peer.start(sock=b_sock)
        await peer.start_tls(CertReloader(tmp_path / "b.crt", tmp_path / "b.key"), sock=b_tls_sock)
        env = {**os.environ, **ENV, "SSL_CERT_FILE": str(tmp_path / "ca.pem")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from gpufleet.cli.app import main; main()",
            "router", "serve", "--fleet", str(fleet), "--region", AWS, "--port", str(a_http),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        session = aiohttp.ClientSession()
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert f"http://127.0.0.1:{a_http} and https://127.0.0.1:{a_https}" in line, line
            base = f"https://localhost:{a_https}"
            until = time.monotonic() + 15
            while True:
                async with session.get(base + "/admin/v1/state", ssl=trusted, headers=ADMIN) as r:
                    state = await r.json()
                regions = {x["region"]: x for x in state["regions"]}
                if "aws-us-west-2" in regions and regions[AWS]["healthy_engines"] == 1:
                    break
                assert time.monotonic() < until, state
                await asyncio.sleep(0.1)
            assert regions["aws-us-west-2"]["healthy_engines"] == 1  # read over verified HTTPS
            assert state["tls"]["port"] == a_https
            async with session.get(base + "/ready", ssl=trusted) as r:
                assert r.status == 200
            async with session.get(f"http://127.0.0.1:{a_http}/scale", headers=ADMIN) as r:
                assert r.status == 200 and (await r.json())["desired_engines"] == 0
            # Drained here, a request goes to the peer over verified HTTPS (the lean upstream client).
            async with session.post(f"http://127.0.0.1:{a_http}/admin/v1/drain", json={"region": AWS},
                                    headers=ADMIN) as r:  # fmt: skip
                assert r.status == 200
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
            async with session.post(f"http://127.0.0.1:{a_http}/v1/chat/completions", json=chat) as r:
                text = await r.text()
                assert (r.status, r.headers["X-Gpufleet-Region"]) == (200, "aws-us-west-2"), text
                assert text.endswith("data: [DONE]\n\n") and text.count("[DONE]") == 1
            # This process trusts only the system store: the peer never got the other summary.
            assert "aws-us-east-1" not in peer.peer_summaries
        finally:
            await session.close()
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await peer.close()
            for e in engines.values():
                await e.stop()
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "Traceback" not in err, err

    run(main(), 90)
