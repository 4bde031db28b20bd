"""AWS: where a GPU's instance types are offered, and how much vCPU quota is left (boto3).

Calls (FACTS.md section 3), per region:
  ec2.describe_instance_type_offerings(LocationType="availability-zone")   which AZs offer the type
  ec2.describe_instance_types                                             GpuInfo, VCpuInfo
  service-quotas.get_service_quota (fallback get_aws_default_service_quota) the vCPU limit
  cloudwatch.get_metric_data on the quota's UsageMetric (AWS/Usage ResourceCount) the vCPUs in use
and once per scan ec2.describe_regions and ec2.get_spot_placement_scores.
Credentials and endpoints come from boto3's standard chain (profiles, environment, AWS_ENDPOINT_URL).

A region whose offerings were read keeps them when a quota or usage call fails (IAM without
servicequotas:*, moto server's 500 for GetAWSDefaultServiceQuota): the quota is reported unknown
with the reason, and the cloud's status is partial.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpufleet.stacks import catalog
from gpufleet.stacks.capacity.model import (
    CloudError,
    CloudResult,
    ErrorKind,
    InstanceOffer,
    Quota,
    RegionCapacity,
    choose_instance,
)
from gpufleet.stacks.capacity.scan import Caller, ScanOptions

TIERS = {"on_demand": "on-demand", "spot": "spot"}
_THROTTLE = {
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "RequestThrottled",
    "SlowDown",
    "ProvisionedThroughputExceededException",
}
_DENIED = {
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "UnauthorizedAccess",
    "Forbidden",
}
_BAD_CREDENTIALS = {
    "AuthFailure",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidAccessKeyId",
    "RequestExpired",
}
_PERMISSIONS = (
    "ec2:DescribeRegions, ec2:DescribeInstanceTypeOfferings, ec2:DescribeInstanceTypes, "
    "servicequotas:GetServiceQuota, cloudwatch:GetMetricData"
)


def translate(exc: BaseException) -> CloudError:
    """botocore exceptions -> one line that says what to do."""
    from botocore import exceptions as be

    if isinstance(exc, CloudError):
        return exc
    if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError, be.CredentialRetrievalError)):
        return CloudError(
            ErrorKind.no_credentials,
            "aws: no credentials found: run `aws configure` or `aws sso login`, or set AWS_PROFILE "
            "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
        )
    if isinstance(exc, (be.ReadTimeoutError, be.ConnectTimeoutError)):
        return CloudError(ErrorKind.timeout, f"aws: the API did not answer in time ({exc})")
    if isinstance(exc, (be.EndpointConnectionError, be.ConnectionClosedError)):
        return CloudError(ErrorKind.unreachable, f"aws: cannot reach the API ({exc})")
    if isinstance(exc, be.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        message = str(err.get("Message", "")).strip()
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        op = getattr(exc, "operation_name", "call")
        if code in _THROTTLE or status == 429:
            return CloudError(ErrorKind.throttled, f"aws: throttled on {op} ({code})", status=status)
        if code in _DENIED:
            return CloudError(
                ErrorKind.denied,
                f"aws: access denied to {op}: give the caller read access ({_PERMISSIONS})",
                status=status,
            )
        if code in _BAD_CREDENTIALS:
            return CloudError(
                ErrorKind.no_credentials,
                f"aws: the credentials were rejected ({code}): refresh them (`aws sso login`, "
                "`aws configure`)",
                status=status,
            )
        if code == "OptInRequired":
            return CloudError(
                ErrorKind.not_enabled,
                f"aws: the region is not enabled for this account: {message}",
                status=status,
            )
        if code == "NoSuchResourceException":
            return CloudError(ErrorKind.not_found, f"aws: {op}: {message or code}", status=status)
        if status is not None and status >= 500:
            return CloudError(
                ErrorKind.unreachable, f"aws: {op} failed on the server side ({code} {status})", status=status
            )
        return CloudError(ErrorKind.failed, f"aws: {op} failed: {code}: {message}", status=status)
    if isinstance(exc, be.BotoCoreError):
        return CloudError(ErrorKind.failed, f"aws: {exc}")
    return CloudError(ErrorKind.failed, f"aws: {type(exc).__name__}: {exc}")


class AwsAdapter:
    cloud = "aws"

    def __init__(self, opts: ScanOptions, session: Any = None):
        self.opts = opts
        self.caller = Caller(translate, opts)
        self._session = session
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()  # boto3 sessions are not thread-safe when creating clients
        self._types = {g: catalog.instances_for_gpu("aws", g) for g in opts.gpus}
        self._unknown: list[str] = []  # "<region>: what could not be read", for the cloud's notes
        # Calls inside one region that can overlap; a separate pool, so region workers that wait on it
        # can never starve it (they do not run in it).
        self._pool = ThreadPoolExecutor(max_workers=max(2, opts.concurrency), thread_name_prefix="aws-calls")

    # -- clients ------------------------------------------------------------------------------------
    def _client(self, service: str, region: str) -> Any:
        from botocore.config import Config

        key = (service, region)
        with self._lock:
            if key not in self._clients:
                cfg = Config(
                    connect_timeout=min(5.0, self.opts.call_timeout_s),
                    read_timeout=self.opts.call_timeout_s,
                    retries={"total_max_attempts": 1},  # scan.Caller retries, uniformly for all clouds
                    max_pool_connections=4,
                )
                kwargs: dict[str, Any] = {"region_name": region, "config": cfg}
                if self.opts.endpoints.get("aws"):
                    kwargs["endpoint_url"] = self.opts.endpoints["aws"]
                self._clients[key] = self._session.client(service, **kwargs)
            return self._clients[key]

    # -- Adapter ------------------------------------------------------------------------------------
    def connect(self) -> list[str]:
        try:
            import boto3
        except ImportError as exc:
            raise CloudError(
                ErrorKind.sdk_missing,
                f"aws: boto3 is not installed ({exc.name}): pip install 'gpufleet[clouds]'",
            ) from None
        if self._session is None:
            try:
                self._session = boto3.Session()
            except Exception as exc:  # noqa: BLE001 - a broken profile is a credentials problem
                raise CloudError(
                    ErrorKind.no_credentials, f"aws: cannot load the AWS profile: {exc}"
                ) from None
        if self._session.get_credentials() is None:
            from botocore.exceptions import NoCredentialsError

            raise translate(NoCredentialsError())
        home = self._session.region_name or "us-east-1"
        if self.opts.regions is not None:
            return list(self.opts.regions)
        ec2 = self._client("ec2", home)
        doc = self.caller.call("describe_regions", ec2.describe_regions, AllRegions=False)
        return sorted(r["RegionName"] for r in doc.get("Regions", []))

    def cloud_jobs(self, regions: list[str]) -> dict[str, Callable[[], Any]]:
        home = self._session.region_name or "us-east-1"
        if not regions:
            return {}
        return {
            f"spot-scores:{g}": functools.partial(self._spot_scores, home, g, regions)
            for g, its in self._types.items()
            if its
        }

    def scan_region(self, region: str) -> list[RegionCapacity]:
        ec2 = self._client("ec2", region)
        wanted = sorted({it.name for its in self._types.values() for it in its})
        zones: dict[str, set[str]] = {}
        if wanted:
            pages = self.caller.call(
                "describe_instance_type_offerings",
                lambda: list(
                    ec2.get_paginator("describe_instance_type_offerings").paginate(
                        LocationType="availability-zone",
                        Filters=[{"Name": "instance-type", "Values": wanted}],
                    )
                ),
            )
            for page in pages:
                for o in page.get("InstanceTypeOfferings", []):
                    zones.setdefault(o["InstanceType"], set()).add(o["Location"])
        # Instance shapes and the quotas of the offered types do not depend on each other: ask at once,
        # so a region costs three round trips (offerings, shapes + quotas, usage) instead of five.
        codes = sorted({c for name in zones for c in catalog.instance_type("aws", name).quota.values()})
        shapes: dict[str, tuple[int, int, str]] = {}
        quotas: dict[str, dict[str, Any]] = {}
        failed: dict[str, CloudError] = {}  # quota code -> why it could not be read
        if zones:
            shapes_f = self._pool.submit(self._shapes, ec2, sorted(zones))
            quota_f = {code: self._pool.submit(self._quota, region, code) for code in codes}
            shapes = shapes_f.result()
            for code, f in quota_f.items():
                try:
                    quotas[code] = f.result()
                except CloudError as exc:  # the offerings above stay: only this quota is unknown
                    failed[code] = exc
        rows = []
        for g, its in self._types.items():
            row = RegionCapacity("aws", region, g)
            for it in its:
                if it.name not in zones:
                    continue
                gpus, vcpus = it.gpus, it.vcpus
                shape = shapes.get(it.name)
                if shape:
                    gpus, vcpus, gpu_name = shape
                    if gpus != it.gpus or vcpus != it.vcpus:
                        row.notes.append(
                            f"{it.name}: AWS reports {gpus} x {gpu_name} and {vcpus} vCPUs; "
                            f"the catalog says {it.gpus} GPUs and {it.vcpus} vCPUs"
                        )
                row.offers.append(
                    InstanceOffer(
                        it.name, gpus, vcpus, sorted(zones[it.name]), catalog.price("aws", region, it.name)
                    )
                )
            row.instance_type = choose_instance(row.offers)
            rows.append(row)
        self._fill_quotas(region, [r for r in rows if r.offered], quotas, failed)
        return rows

    def finish(self, rows, cloud_results, cloud_errors):
        self._pool.shutdown(wait=False)
        result = CloudResult("aws")
        if self._unknown:
            result.status = "partial"
            result.notes.extend(sorted(set(self._unknown)))
        for key, err in cloud_errors.items():
            # Spot scores need ec2:GetSpotPlacementScores; without it the scan is still useful.
            result.notes.append(f"spot placement scores not read ({key}): {err.message}")
        for row in rows:
            scores = cloud_results.get(f"spot-scores:{row.gpu}") or {}
            row.spot_score = scores.get(row.region)
        return rows, result

    # -- calls ------------------------------------------------------------------------------------
    def _shapes(self, ec2: Any, names: list[str]) -> dict[str, tuple[int, int, str]]:
        doc = self.caller.call("describe_instance_types", ec2.describe_instance_types, InstanceTypes=names)
        out = {}
        for t in doc.get("InstanceTypes", []):
            gpus = t.get("GpuInfo", {}).get("Gpus", [])
            count = sum(g.get("Count", 0) for g in gpus)
            name = "/".join(g.get("Name", "?") for g in gpus) or "no GPU"
            out[t["InstanceType"]] = (count, t.get("VCpuInfo", {}).get("DefaultVCpus", 0), name)
        return out

    def _quota(self, region: str, code: str) -> dict[str, Any]:
        """One EC2 vCPU quota from service-quotas: the applied value, else the default."""
        sq = self._client("service-quotas", region)
        try:
            doc = self.caller.call(
                "get_service_quota", sq.get_service_quota, ServiceCode="ec2", QuotaCode=code
            )
        except CloudError as exc:
            if exc.kind is not ErrorKind.not_found:
                raise
            # No applied value yet: the default is what the account has.
            doc = self.caller.call(
                "get_aws_default_service_quota",
                sq.get_aws_default_service_quota,
                ServiceCode="ec2",
                QuotaCode=code,
            )
        return doc["Quota"]

    def _fill_quotas(
        self,
        region: str,
        rows: list[RegionCapacity],
        quotas: dict[str, dict[str, Any]],
        failed: dict[str, CloudError],
    ) -> None:
        """Quota limits (service-quotas) and usage (CloudWatch) converted to GPUs of each row's instance.

        A quota in `failed` stays out of the row (unknown: obtainable counts 0) with a note saying why."""
        if not rows:
            return
        try:
            used = self._usage(region, quotas)
        except CloudError as exc:
            # The limits are still worth having; `used` None is what the table shows as "?".
            used = {}
            self._unknown.append(f"{region}: vCPU usage unknown ({exc.message}); quota limits kept")
            for row in rows:
                row.notes.append(f"vCPU usage unknown ({exc.message}): free GPUs assume none in use")
        for row in rows:
            offer = row.offer
            if offer is None:  # the caller passes offered rows only, and those always have one
                continue
            it = catalog.instance_type("aws", offer.name)
            for tier_key, code in it.quota.items():
                if code in failed:
                    why = failed[code].message
                    row.notes.append(
                        f"{TIERS[tier_key]} quota unknown ({code}: {why}); offerings kept, obtainable GPUs "
                        "count 0 until the quota can be read"
                    )
                    self._unknown.append(f"{region}: quota {code} unknown ({why}); offerings kept")
                    continue
                q = quotas.get(code)
                if q is None:
                    continue
                row.quota[TIERS[tier_key]] = Quota.of(
                    code,
                    "vcpu",
                    float(q.get("Value", 0.0)),
                    used.get(code),
                    per_node=offer.vcpus,
                    gpus_per_node=offer.gpus,
                )

    def _usage(self, region: str, quotas: dict[str, dict[str, Any]]) -> dict[str, float]:
        """vCPUs in use per quota code, from each quota's own UsageMetric (what the console shows)."""
        queries, ids = [], {}
        for i, (code, q) in enumerate(sorted(quotas.items())):
            m = q.get("UsageMetric")
            if not m or not m.get("MetricName"):
                continue
            qid = f"q{i}"
            ids[qid] = code
            queries.append(
                {
                    "Id": qid,
                    "MetricStat": {
                        "Metric": {
                            "Namespace": m.get("MetricNamespace", "AWS/Usage"),
                            "MetricName": m["MetricName"],
                            "Dimensions": [
                                {"Name": k, "Value": v}
                                for k, v in sorted(m.get("MetricDimensions", {}).items())
                            ],
                        },
                        "Period": 3600,
                        "Stat": m.get("MetricStatisticRecommendation", "Maximum"),
                    },
                }
            )
        if not queries:
            return {}
        now = dt.datetime.now(dt.UTC)
        cw = self._client("cloudwatch", region)
        doc = self.caller.call(
            "get_metric_data",
            cw.get_metric_data,
            MetricDataQueries=queries,
            StartTime=now - dt.timedelta(hours=1),
            EndTime=now + dt.timedelta(minutes=1),
        )
        out: dict[str, float] = {}
        for res in doc.get("MetricDataResults", []):
            values = res.get("Values") or []
            # No datapoint in the last hour means nothing of that class ran.
            out[ids[res["Id"]]] = max(values) if values else 0.0
        return out

    def _spot_scores(self, home: str, gpu: str, regions: list[str]) -> dict[str, int]:
        ec2 = self._client("ec2", home)
        types = [it.name for it in self._types[gpu]]
        pages = self.caller.call(
            "get_spot_placement_scores",
            lambda: list(
                ec2.get_paginator("get_spot_placement_scores").paginate(
                    InstanceTypes=types,
                    TargetCapacity=1,
                    SingleAvailabilityZone=False,
                    RegionNames=regions,
                )
            ),
        )
        return {
            s["Region"]: int(s["Score"])
            for p in pages
            for s in p.get("SpotPlacementScores", [])
            if "Region" in s
        }
