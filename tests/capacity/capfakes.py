"""Loopback stand-ins for the three clouds' capacity APIs, answering in their real wire formats.

- AWS: moto's server (real botocore over HTTP) behind a small proxy that answers what moto 5 lacks
  at the HTTP level: Service Quotas for EC2 (moto only knows VPC quotas) and GetSpotPlacementScores.
- GCP: the compute REST API paths the google-cloud-compute REST transport calls.
- Azure: the ARM paths azure-mgmt-compute calls for resource SKUs and usages.
Every server can add latency to each call and inject faults (throttle, deny, hang), per request.
The templates come from fixtures/ (see fixtures/README.md for the documentation of each shape).
"""

from __future__ import annotations

import copy
import http.client
import json
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> Any:
    text = (FIXTURES / name).read_text()
    return json.loads(text) if name.endswith(".json") else text


@dataclass
class Req:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def q(self, key: str, default: str | None = None) -> str | None:
        return self.query.get(key, [default])[0]


@dataclass
class Resp:
    status: int
    body: bytes | str | dict
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if isinstance(self.body, dict):
            headers.setdefault("Content-Type", "application/json")
            return json.dumps(self.body).encode(), headers
        if isinstance(self.body, str):
            return self.body.encode(), headers
        return self.body, headers


Fault = Callable[[Req], "Resp | None"]


class Loopback:
    """A threaded HTTP/1.1 server on 127.0.0.1 at a free port; `app(req)` answers each request."""

    def __init__(self, app: Callable[[Req], Resp], latency_s: float = 0.0):
        self.app = app
        self.latency_s = latency_s
        self.fault: Fault | None = None
        self.calls = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urllib.parse.urlsplit(self.path)
                req = Req(
                    self.command,
                    parts.path,
                    urllib.parse.parse_qs(parts.query, keep_blank_values=True),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with outer._lock:
                    outer.calls += 1
                if outer.latency_s:
                    time.sleep(outer.latency_s)
                resp = outer.fault(req) if outer.fault else None
                if resp is None:
                    resp = outer.app(req)
                data, headers = resp.encoded()
                try:
                    self.send_response(resp.status)
                    for k, v in headers.items():
                        if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 128
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Loopback:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    """A client that gives up (the timeout tests) may reset a kept-alive connection while the server
    waits for its next request line: socketserver would print that traceback to stderr, where the
    CLI tests look for tracebacks of the CLI's own. Any other error is still printed."""

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


# -- fault helpers -----------------------------------------------------------------------------------
def hang(seconds: float, match: Callable[[Req], bool] = lambda r: True) -> Fault:
    def fault(req: Req) -> Resp | None:
        if match(req):
            time.sleep(seconds)
        return None

    return fault


def first_n(n: int, resp: Callable[[Req], Resp], match: Callable[[Req], bool] = lambda r: True) -> Fault:
    """Answer the first n matching requests with `resp`, then let the real handler answer."""
    left = {"n": n}
    lock = threading.Lock()

    def fault(req: Req) -> Resp | None:
        if not match(req):
            return None
        with lock:
            if left["n"] <= 0:
                return None
            left["n"] -= 1
        return resp(req)

    return fault


# -- AWS ---------------------------------------------------------------------------------------------
def aws_region_of(req: Req) -> str:
    """The region from the SigV4 scope: Credential=AKID/20250101/<region>/<service>/aws4_request."""
    m = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/", req.headers.get("authorization", ""))
    return m.group(1) if m else "us-east-1"


def aws_action(req: Req) -> str:
    target = req.headers.get("x-amz-target", "")
    if target:
        return target.rsplit(".", 1)[-1]
    if req.body and b"Action=" in req.body:
        return urllib.parse.parse_qs(req.body.decode()).get("Action", [""])[0]
    return ""


def aws_json_error(code: str, message: str, status: int = 400) -> Resp:
    # awsJson1_1 errors: the code in __type (https://smithy.io/2.0/aws/protocols/aws-json-1_1-protocol.html)
    return Resp(status, {"__type": code, "message": message}, {"Content-Type": "application/x-amz-json-1.1"})


def aws_query_error(code: str, message: str, status: int = 400) -> Resp:
    # EC2 query error body (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html)
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>req-1</RequestID></Response>"
    )
    return Resp(status, body, {"Content-Type": "text/xml"})


class AwsFake:
    """moto server + a proxy that answers EC2 service quotas and spot placement scores itself."""

    def __init__(
        self,
        quotas: dict[str, float] | None = None,
        spot_scores: dict[str, int] | None = None,
        applied: bool = True,
        latency_s: float = 0.0,
    ):
        self.quotas = dict(
            quotas
            or {
                "L-417A185B": 384.0,
                "L-C4BD4855": 192.0,
                "L-7212CCBC": 96.0,
                "L-DB2E81BA": 64.0,
                "L-3819A6DF": 64.0,
            }
        )
        self.region_quotas: dict[tuple[str, str], float] = {}  # (region, code) overrides
        self.spot_scores = dict(spot_scores or {})
        self.applied = applied  # False: GetServiceQuota says NoSuchResource, the default answers
        self.latency_s = latency_s

    def start(self) -> AwsFake:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.moto_url = f"http://{host}:{port}"
        self._moto_addr = (host, port)
        self.proxy = Loopback(self._app, self.latency_s).start()
        return self

    def stop(self) -> None:
        self.proxy.stop()
        self.moto.stop()

    @property
    def url(self) -> str:
        return self.proxy.url

    def _app(self, req: Req) -> Resp:
        target = req.headers.get("x-amz-target", "")
        if target.startswith("ServiceQuotasV20190624."):
            return self._service_quotas(req, target.rsplit(".", 1)[1])
        if aws_action(req) == "GetSpotPlacementScores":
            return self._spot(req)
        return self._forward(req)

    def _forward(self, req: Req) -> Resp:
        conn = http.client.HTTPConnection(*self._moto_addr, timeout=30)
        path = req.path + ("?" + urllib.parse.urlencode(req.query, doseq=True) if req.query else "")
        headers = {k: v for k, v in req.headers.items() if k not in ("connection", "content-length", "host")}
        headers["Host"] = "{}:{}".format(*self._moto_addr)
        conn.request(req.method, path, body=req.body or None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        out = {
            k: v
            for k, v in r.getheaders()
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date")
        }
        conn.close()
        return Resp(r.status, data, out)

    def _service_quotas(self, req: Req, op: str) -> Resp:
        doc = json.loads(req.body or b"{}")
        region = aws_region_of(req)
        code = doc.get("QuotaCode", "")
        if op not in ("GetServiceQuota", "GetAWSDefaultServiceQuota"):
            return aws_json_error("InvalidAction", f"{op} is not answered by this fake", 400)
        if doc.get("ServiceCode") != "ec2" or code not in self.quotas:
            return aws_json_error(
                "NoSuchResourceException",
                f"The request failed because the specified quota {code} does not exist.",
            )
        if op == "GetServiceQuota" and not self.applied:
            return aws_json_error("NoSuchResourceException", "No applied quota value")
        template = fixture("aws_get_service_quota.json")
        q = template["Quota"]
        value = self.region_quotas.get((region, code), self.quotas[code])
        q.update(
            QuotaCode=code, Value=value, QuotaArn=f"arn:aws:servicequotas:{region}:123456789012:ec2/{code}"
        )
        klass = {
            "L-417A185B": "P/OnDemand",
            "L-DB2E81BA": "G/OnDemand",
            "L-C4BD4855": "P5/Spot",
            "L-7212CCBC": "P/Spot",
            "L-3819A6DF": "G/Spot",
        }.get(code, "Standard/OnDemand")
        q["UsageMetric"]["MetricDimensions"]["Class"] = klass
        return Resp(200, template, {"Content-Type": "application/x-amz-json-1.1"})

    def _spot(self, req: Req) -> Resp:
        form = urllib.parse.parse_qs(req.body.decode())
        regions = [v[0] for k, v in sorted(form.items()) if k.startswith("RegionName.")]
        scored = sorted(((self.spot_scores.get(r, 1), r) for r in regions), reverse=True)[:10]
        items = "".join(f"<item><region>{r}</region><score>{s}</score></item>" for s, r in scored)
        body = fixture("aws_get_spot_placement_scores.xml")
        body = re.sub(
            r"<spotPlacementScoreSet>.*</spotPlacementScoreSet>",
            f"<spotPlacementScoreSet>{items}</spotPlacementScoreSet>",
            body,
            flags=re.S,
        )
        return Resp(200, body, {"Content-Type": "text/xml"})


# -- GCP ---------------------------------------------------------------------------------------------
def gcp_error(code: int, message: str, reason: str, status: str = "PERMISSION_DENIED") -> Resp:
    body = fixture("gcp_error_403.json")
    body["error"].update(code=code, message=message, status=status)
    body["error"]["errors"][0].update(message=message, reason=reason)
    return Resp(code, body)


@dataclass
class GcpWorld:
    project: str = "demo-project"
    # region -> {"zones": [...], "quotas": {metric: (limit, usage)}}
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)
    accelerators: dict[str, list[str]] = field(default_factory=dict)  # zone -> accelerator names
    machines: dict[str, list[str]] = field(default_factory=dict)  # zone -> machine type names
    global_quota: tuple[float, float] = (64.0, 0.0)
    page_size: int = 3  # scopes per aggregated page / regions per list page


def _gcp_filter(expr: str | None) -> Callable[[str], bool]:
    if not expr:
        return lambda name: True
    m = re.fullmatch(r'\s*name\s+eq\s+"?(.+?)"?\s*', expr)
    if not m:
        return lambda name: True
    rx = re.compile(m.group(1))
    return lambda name: rx.fullmatch(name) is not None  # RE2 semantics: the whole field must match


class GcpFake:
    def __init__(self, world: GcpWorld, latency_s: float = 0.0):
        self.world = world
        self.server = Loopback(self._app, latency_s)

    def start(self) -> GcpFake:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def _app(self, req: Req) -> Resp:
        w = self.world
        prefix = f"/compute/v1/projects/{w.project}"
        if not req.path.startswith("/compute/v1/projects/"):
            return gcp_error(404, f"The requested URL {req.path} was not found.", "notFound", "NOT_FOUND")
        if not (req.path == prefix or req.path.startswith(prefix + "/")):
            return gcp_error(404, "The resource 'projects/x' was not found", "notFound", "NOT_FOUND")
        rest = req.path[len(prefix) :]
        if rest == "":
            doc = fixture("gcp_project.json")
            doc["name"] = w.project
            doc["quotas"] = [
                {"metric": "SNAPSHOTS", "limit": 5000, "usage": 0},
                {"metric": "GPUS_ALL_REGIONS", "limit": w.global_quota[0], "usage": w.global_quota[1]},
            ]
            return Resp(200, doc)
        if rest == "/regions":
            names = sorted(w.regions)
            start = int(req.q("pageToken") or 0)
            page = names[start : start + w.page_size]
            doc: dict[str, Any] = {
                "kind": "compute#regionList",
                "id": f"projects/{w.project}/regions",
                "items": [self._region(n) for n in page],
                "selfLink": f"https://www.googleapis.com/compute/v1/projects/{w.project}/regions",
            }
            if start + w.page_size < len(names):
                doc["nextPageToken"] = str(start + w.page_size)
            return Resp(200, doc)
        m = re.fullmatch(r"/regions/([a-z0-9-]+)", rest)
        if m:
            if m.group(1) not in w.regions:
                return gcp_error(
                    404,
                    f"The resource 'projects/{w.project}/regions/{m.group(1)}' was not found",
                    "notFound",
                    "NOT_FOUND",
                )
            return Resp(200, self._region(m.group(1)))
        if rest in ("/aggregated/acceleratorTypes", "/aggregated/machineTypes"):
            return self._aggregated(req, rest.endswith("acceleratorTypes"))
        return gcp_error(404, f"no route {rest}", "notFound", "NOT_FOUND")

    def _region(self, name: str) -> dict[str, Any]:
        doc = fixture("gcp_region.json")
        spec = self.world.regions[name]
        base = f"https://www.googleapis.com/compute/v1/projects/{self.world.project}"
        doc.update(
            name=name,
            description=name,
            selfLink=f"{base}/regions/{name}",
            zones=[f"{base}/zones/{z}" for z in spec.get("zones", [])],
            quotas=[{"metric": k, "limit": v[0], "usage": v[1]} for k, v in spec.get("quotas", {}).items()],
        )
        return doc

    def _aggregated(self, req: Req, accelerators: bool) -> Resp:
        w = self.world
        key = "acceleratorTypes" if accelerators else "machineTypes"
        template_doc = fixture(
            "gcp_accelerator_types_aggregated.json" if accelerators else "gcp_machine_types_aggregated.json"
        )
        template = template_doc["items"]["zones/us-central1-a"][key][0]
        warning = fixture("gcp_accelerator_types_aggregated.json")["items"]["zones/us-central1-f"]["warning"]
        keep = _gcp_filter(req.q("filter"))
        offered = w.accelerators if accelerators else w.machines
        zones = sorted({z for r in w.regions.values() for z in r.get("zones", [])} | set(offered))
        start = int(req.q("pageToken") or 0)
        items: dict[str, Any] = {}
        base = f"https://www.googleapis.com/compute/v1/projects/{w.project}"
        from gpufleet.stacks import catalog

        for zone in zones[start : start + w.page_size]:
            found = []
            for name in offered.get(zone, []):
                if not keep(name):
                    continue
                item = copy.deepcopy(template)
                item["name"] = name
                item["selfLink"] = f"{base}/zones/{zone}/{key}/{name}"
                if accelerators:
                    item["zone"] = f"{base}/zones/{zone}"
                else:
                    item["zone"] = zone  # machineTypes carry the bare zone name
                    it = catalog.instance_types("gcp").get(name)
                    if it:
                        item["guestCpus"] = it.vcpus
                        item["accelerators"] = [
                            {"guestAcceleratorType": it.accelerator, "guestAcceleratorCount": it.gpus}
                        ]
                found.append(item)
            if found:
                items[f"zones/{zone}"] = {key: found}
            else:
                wn = copy.deepcopy(warning)
                wn["message"] = f"There are no results for scope 'zones/{zone}' on this page."
                wn["data"] = [{"key": "scope", "value": f"zones/{zone}"}]
                items[f"zones/{zone}"] = {"warning": wn}
        doc = {
            "kind": template_doc["kind"],
            "id": f"projects/{w.project}/aggregated/{key}",
            "items": items,
            "selfLink": f"{base}/aggregated/{key}",
        }
        if start + w.page_size < len(zones):
            doc["nextPageToken"] = str(start + w.page_size)
        return Resp(200, doc)


# -- Azure -------------------------------------------------------------------------------------------
def azure_error(status: int, code: str, message: str) -> Resp:
    body = fixture("azure_error_403.json")
    body["error"].update(code=code, message=message)
    return Resp(status, body, {"x-ms-failure-cause": "gateway"})


@dataclass
class AzureSku:
    name: str
    zones: list[str] = field(default_factory=lambda: ["1", "2", "3"])
    restricted_zones: list[str] = field(default_factory=list)
    closed: bool = False  # NotAvailableForSubscription in the whole location


@dataclass
class AzureWorld:
    subscription: str = "00000000-0000-0000-0000-000000000001"
    regions: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # region -> {"skus": [...], "usages": {}}
    page_size: int = 2  # SKUs per page, so nextLink paging is exercised


class AzureFake:
    def __init__(self, world: AzureWorld, latency_s: float = 0.0):
        self.world = world
        self.server = Loopback(self._app, latency_s)

    def start(self) -> AzureFake:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def _app(self, req: Req) -> Resp:
        w = self.world
        if not req.headers.get("authorization", "").startswith("Bearer "):
            return azure_error(
                401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing."
            )
        if not req.q("api-version"):
            return azure_error(
                400, "MissingApiVersionParameter", "The api-version query parameter is required."
            )
        prefix = f"/subscriptions/{w.subscription}/providers/Microsoft.Compute"
        if not req.path.startswith(prefix):
            return azure_error(404, "SubscriptionNotFound", "The subscription could not be found.")
        rest = req.path[len(prefix) :]
        if rest == "/skus":
            m = re.fullmatch(r"location eq '([a-z0-9]+)'", req.q("$filter") or "")
            regions = [m.group(1)] if m else sorted(w.regions)
            skus = [self._sku(s, r) for r in regions for s in w.regions.get(r, {}).get("skus", [])]
            start = int(req.q("$skiptoken") or 0)
            doc: dict[str, Any] = {"value": skus[start : start + w.page_size]}
            if start + w.page_size < len(skus):
                q = {k: v[0] for k, v in req.query.items()}
                q["$skiptoken"] = str(start + w.page_size)
                doc["nextLink"] = f"{self.url}{req.path}?{urllib.parse.urlencode(q)}"
            return Resp(200, doc)
        m = re.fullmatch(r"/locations/([a-z0-9]+)/usages", rest)
        if m:
            region = m.group(1)
            if region not in w.regions:
                return azure_error(
                    404,
                    "NoRegisteredProviderFound",
                    f"No registered resource provider found for location '{region}'.",
                )
            template = fixture("azure_usages.json")["value"][0]
            value = []
            for name, (current, limit) in w.regions[region].get("usages", {}).items():
                u = copy.deepcopy(template)
                u.update(currentValue=current, limit=limit)
                u["name"] = {"value": name, "localizedValue": f"{name} vCPUs"}
                value.append(u)
            return Resp(200, {"value": value})
        return azure_error(404, "InvalidResourceType", f"no route {rest}")

    def _sku(self, spec: AzureSku | dict, region: str) -> dict[str, Any]:
        from gpufleet.stacks import catalog

        if isinstance(spec, dict):
            spec = AzureSku(**spec)
        doc = copy.deepcopy(fixture("azure_resource_skus.json")["value"][0])
        it = catalog.instance_types("azure").get(spec.name)
        doc.update(
            name=spec.name,
            size=spec.name.removeprefix("Standard_"),
            locations=[region],
            locationInfo=[{"location": region, "zones": spec.zones, "zoneDetails": []}],
        )
        if it is not None:
            doc["family"] = it.family[0].upper() + it.family[1:]  # SKUs spell families capitalised
            doc["capabilities"] = [
                {"name": "vCPUs", "value": str(it.vcpus)},
                {"name": "GPUs", "value": str(it.gpus)},
            ]
        else:
            doc["family"] = "standardDSv5Family"
            doc["capabilities"] = [{"name": "vCPUs", "value": "2"}]
        restrictions = []
        if spec.closed:
            restrictions.append(
                {
                    "type": "Location",
                    "values": [region],
                    "restrictionInfo": {"locations": [region]},
                    "reasonCode": "NotAvailableForSubscription",
                }
            )
        if spec.restricted_zones:
            restrictions.append(
                {
                    "type": "Zone",
                    "values": [region],
                    "restrictionInfo": {"locations": [region], "zones": spec.restricted_zones},
                    "reasonCode": "NotAvailableForSubscription",
                }
            )
        doc["restrictions"] = restrictions
        return doc


# -- worlds for tests and the benchmark -------------------------------------------------------------
def gcp_world(
    regions: list[str],
    gpu_metric: str = "NVIDIA_H100_GPUS",
    limit: float = 16,
    usage: float = 0,
    accelerator: str = "nvidia-h100-80gb",
    machines: tuple[str, ...] = ("a3-highgpu-1g", "a3-highgpu-8g"),
) -> GcpWorld:
    w = GcpWorld()
    for r in regions:
        zones = [f"{r}-a", f"{r}-b", f"{r}-c"]
        w.regions[r] = {
            "zones": zones,
            "quotas": {
                "CPUS": (2400, 0),
                gpu_metric: (limit, usage),
                "PREEMPTIBLE_" + gpu_metric: (limit * 2, 0),
            },
        }
        for z in zones[:2]:
            w.accelerators[z] = [accelerator, "nvidia-l4"]
            w.machines[z] = list(machines) + ["n2-standard-8"]
    return w


def azure_world(
    regions: list[str],
    sku: str = "Standard_ND96isr_H100_v5",
    family: str = "standardNDSH100v5Family",
    limit: float = 192,
    used: float = 0,
) -> AzureWorld:
    w = AzureWorld()
    for r in regions:
        w.regions[r] = {
            "skus": [AzureSku("Standard_D2s_v5"), AzureSku(sku), AzureSku("Standard_NC24ads_A100_v4")],
            "usages": {"cores": (0, 1000), family: (used, limit), "lowPriorityCores": (0, 96)},
        }
    return w
