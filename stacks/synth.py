"""Fleet spec to cdktn App: one cluster stack per (cloud, region), then the serving stacks.

`build_app(fleet, outdir)` is the one place that turns a `Fleet` into stacks; `gpufleet synth`,
`python -m gpufleet.stacks.app` (what `cdktn synth` runs through cdktf.json) and the tests all use it.
cdktn and the providers are imported inside the functions: importing them costs 15-30 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.modules.cluster import ClusterOutputs, ClusterProps, props_for_region

if TYPE_CHECKING:
    from cdktn import App, TerraformStack
    from gpufleet.stacks.spec import Fleet, Region

DEFAULT_OUTDIR = Path("cdktf.out")
# What the stacks need to deploy: S3-native state locking came with Terraform and OpenTofu 1.10. cdktn
# validates backend features against these (cdktf.json `targetVersions` would set the same).
TARGET_VERSIONS = {"terraform": ">=1.10.0", "opentofu": ">=1.10.0"}
STATE_DIR_NAME = "terraform-state"  # local backend: beside the output folder, so a re-synth keeps it
# Beside manifest.json: which fleet file the output was synthesized from (plan-check reads it).
FLEET_RECORD = "gpufleet.json"
FLEET_RECORD_SCHEMA = "gpufleet.synth/v1"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ClusterStackHandle:
    """One region's cluster stack, for the serving stacks to build on."""

    name: str  # the stack name, <cloud>-<region>-cluster
    stack: TerraformStack
    region: Region
    props: ClusterProps
    outputs: ClusterOutputs  # cdktn tokens; cross-stack use wires remote state automatically


@dataclass(frozen=True)
class StackSummary:
    name: str
    resources: int
    data_sources: int
    outputs: int
    resource_types: dict[str, int]


def stack_name(region: Region, kind: str = "cluster") -> str:
    return f"{region.key}-{kind}"


def prepare_runtime() -> None:
    """Run jsii on the project's Node 22 when it is there (Node 20 prints an end-of-life banner)."""
    os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
    if "JSII_NODE" in os.environ:
        return
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        node = root / "node_modules" / ".bin" / "node"
        if node.is_file() and os.access(node, os.X_OK):
            os.environ["JSII_NODE"] = str(node)
            return


def configure_backend(stack: TerraformStack, fleet: Fleet, name: str, outdir: Path | None) -> None:
    """Each stack keeps its own state: a local file by default, else the fleet's bucket/container."""
    from cdktn import AzurermBackend, GcsBackend, LocalBackend, S3Backend

    state = fleet.settings.state
    key = f"{state.prefix}/{fleet.fleet}/{name}"
    # StateBackend._complete has required each backend's fields, so the asserts below only narrow types.
    if state.backend == "s3":
        assert state.bucket is not None
        S3Backend(
            stack,
            bucket=state.bucket,
            key=f"{key}.tfstate",
            region=state.region,
            encrypt=True,
            use_lockfile=True,  # S3-native locking, no DynamoDB table: needs Terraform/OpenTofu >= 1.10
        )
    elif state.backend == "gcs":
        assert state.bucket is not None
        GcsBackend(stack, bucket=state.bucket, prefix=key)
    elif state.backend == "azurerm":
        assert state.storage_account is not None and state.container is not None
        AzurermBackend(
            stack,
            storage_account_name=state.storage_account,
            container_name=state.container,
            resource_group_name=state.resource_group,
            key=f"{key}.tfstate",
            use_azuread_auth=True,
        )
    else:
        # Relative to the stack's folder (where terraform runs), so the JSON has no absolute paths.
        out = Path(outdir or DEFAULT_OUTDIR)
        path = Path(os.path.relpath(out.parent / STATE_DIR_NAME / f"{name}.tfstate", out / "stacks" / name))
        LocalBackend(stack, path=path.as_posix())


def _cluster_stack(app: App, fleet: Fleet, region: Region, outdir: Path | None) -> ClusterStackHandle:
    from cdktn import TerraformStack, TerraformVariable
    from gpufleet.modules.cluster import add_provider, build_cluster, emit_outputs

    name = stack_name(region)
    stack = TerraformStack(app, name)
    props = props_for_region(fleet, region)
    if props.cloud == "gcp":
        # The project is the operator's, not the fleet's: TF_VAR_gcp_project or -var at plan time.
        project = TerraformVariable(
            stack, "gcp_project", type="string", description="GCP project that holds this cluster"
        )
        props = replace(props, project=project.string_value)
    add_provider(stack, props)
    configure_backend(stack, fleet, name, outdir)
    cluster = build_cluster(stack, "cluster", props)
    emit_outputs(stack, cluster.outputs)
    return ClusterStackHandle(name=name, stack=stack, region=region, props=props, outputs=cluster.outputs)


def build_app(
    fleet: Fleet,
    outdir: str | Path | None = None,
    *,
    image: str | None = None,
    progress: Progress | None = None,
) -> tuple[App, dict[str, ClusterStackHandle]]:
    """The cdktn App for the fleet, and its cluster stacks by region key.

    `outdir` None lets the App take it from the environment (what `cdktn synth` sets). `image`
    overrides the fleet's serving.image; with neither, ImageError (a ValueError) before any import.
    """
    from gpufleet.modules.k8s_objects import serving_image

    serving = serving_image(fleet, image)
    prepare_runtime()
    say = progress or (lambda _msg: None)
    say("loading cdktn and the cloud providers")
    from cdktn import App

    out = Path(outdir) if outdir is not None else None
    # stack_traces off: keeps the JSON free of source paths, so it is stable (the golden test).
    options: dict[str, Any] = {"stack_traces": False, "context": {"targetVersions": TARGET_VERSIONS}}
    app = App(outdir=str(out), **options) if out is not None else App(**options)
    clusters: dict[str, ClusterStackHandle] = {}
    for region in fleet.regions:
        say(f"building {stack_name(region)} ({region.gpu} on {region.cloud.value} {region.region})")
        clusters[region.key] = _cluster_stack(app, fleet, region, out)
    from gpufleet.stacks.serving_stacks import add_serving_stacks

    say("building the add-ons, serving and global traffic stacks")
    add_serving_stacks(app, fleet, clusters, image=serving)
    return app, clusters


def synth_fleet(
    fleet: Fleet,
    outdir: str | Path = DEFAULT_OUTDIR,
    *,
    image: str | None = None,
    progress: Progress | None = None,
    fleet_path: str | Path | None = None,
) -> list[StackSummary]:
    """Synthesize the fleet into `outdir` (stale stacks removed) and summarize what was written.

    `fleet_path`, the file `fleet` was read from, is recorded in `outdir/gpufleet.json`."""
    from gpufleet.modules.k8s_objects import serving_image

    serving_image(fleet, image)  # refuse a missing or registry-less image before touching `outdir`
    out = Path(outdir)
    stacks_dir = out / "stacks"
    if stacks_dir.is_dir():
        shutil.rmtree(stacks_dir)  # a region removed from the fleet must not leave its stack behind
    (out / FLEET_RECORD).unlink(missing_ok=True)  # nor an earlier synthesis its fleet record
    app, _ = build_app(fleet, out, image=image, progress=progress)
    (progress or (lambda _m: None))(f"writing Terraform JSON to {out}/")
    app.synth()
    if fleet_path is not None:
        write_fleet_record(out, fleet_path)
    return summarize(out)


@dataclass(frozen=True)
class FleetRecord:
    """`gpufleet.json` of a synthesized folder: the fleet file it came from, and that file's hash."""

    record: Path  # the record file
    fleet: Path  # the fleet file, resolved against the record's folder
    sha256: str

    @property
    def changed(self) -> bool:
        """True when the fleet file no longer holds what was synthesized (False when it is missing)."""
        return self.fleet.is_file() and _sha256(self.fleet) != self.sha256


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_fleet_record(outdir: str | Path, fleet_path: str | Path) -> Path:
    """Record which fleet file `outdir` was synthesized from: its path relative to `outdir` (so the
    pair can move together, e.g. a checkout in CI) and its sha256."""
    out, src = Path(outdir), Path(fleet_path)
    doc = {
        "schema": FLEET_RECORD_SCHEMA,
        "fleet": Path(os.path.relpath(src.resolve(), out.resolve())).as_posix(),
        "sha256": _sha256(src),
    }
    path = out / FLEET_RECORD
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def read_fleet_record(outdir: str | Path) -> FleetRecord | None:
    """The record of `outdir`, None where there is none; ValueError (one line) for a record that
    cannot be used."""
    path = Path(outdir) / FLEET_RECORD
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("schema") != FLEET_RECORD_SCHEMA
        or not isinstance(doc.get("fleet"), str)
        or not isinstance(doc.get("sha256"), str)
    ):
        raise ValueError(f"{path}: is not a {FLEET_RECORD_SCHEMA} record (schema, fleet, sha256)")
    return FleetRecord(record=path, fleet=(path.parent / doc["fleet"]).resolve(), sha256=doc["sha256"])


def summarize(outdir: str | Path) -> list[StackSummary]:
    """Stacks and their resource counts, read back from the synthesized files."""
    out = Path(outdir)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for name, entry in sorted(manifest["stacks"].items()):
        doc = json.loads((out / entry["synthesizedStackPath"]).read_text())
        rows.append(_summary(name, doc))
    return rows


def _summary(name: str, doc: dict[str, Any]) -> StackSummary:
    types = {t: len(v) for t, v in sorted(doc.get("resource", {}).items())}
    return StackSummary(
        name=name,
        resources=sum(types.values()),
        data_sources=sum(len(v) for v in doc.get("data", {}).values()),
        outputs=len(doc.get("output", {})),
        resource_types=types,
    )
