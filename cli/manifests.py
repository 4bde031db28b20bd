"""gpufleet manifests: the Kubernetes objects of the serving stacks as plain YAML, for kubectl or Helm.

The objects come from modules/k8s_objects.py, the same description the cdktn serving stacks render,
so the two cannot drift. The router's admin token Secret is not written (its value must not sit in a
file): create it first with `kubectl create secret`, as the header of each file says.
Only Typer and the standard library at top level.
"""

from __future__ import annotations

from pathlib import Path

import typer
from gpufleet.cli.common import DEFAULT_FLEET, EXIT_BAD_INPUT, fail, load_fleet_or_exit

SECRET_HINT = """\
# Before `kubectl apply -f` this file, create the router's admin token (never stored in a manifest):
#   kubectl create namespace {ns} --dry-run=client -o yaml | kubectl apply -f -
#   kubectl -n {ns} create secret generic {secret} --from-literal={key}="$(openssl rand -hex 32)"
# Gated models (Llama) also need a Hugging Face token (the engines wait for this Secret):
#   kubectl -n {ns} create secret generic {hf} --from-literal=token="$HF_TOKEN"
# The KEDA ScaledObject and the cert-manager objects at the end need KEDA and cert-manager installed
# (the add-ons stacks install them; see docs/stacks.md).
"""


def render_region(fleet, region, image: str) -> str:
    """One region's objects as a multi-document YAML string, with the secret instructions on top."""
    import yaml
    from gpufleet.modules import k8s_objects as k8s

    header = SECRET_HINT.format(
        ns=k8s.NAMESPACE, secret=k8s.ADMIN_SECRET, key=k8s.ADMIN_SECRET_KEY, hf=fleet.serving.hf_secret_name
    )
    header = f"# gpufleet {fleet.fleet}: serving objects for region {region.key}\n" + header
    docs = k8s.region_objects(fleet, region, image)
    return header + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def manifests(
        fleet_file: Path = typer.Argument(DEFAULT_FLEET, help="fleet file"),
        region: str | None = typer.Option(None, "--region", help="only this region id (<cloud>-<region>)"),
        out: Path | None = typer.Option(
            None, "--out", help="write <region>.yaml files into this folder; default: print to stdout"
        ),
        image: str | None = typer.Option(
            None, "--image", help="serving image (built from serving/Dockerfile); overrides serving.image"
        ),
    ) -> None:
        """Write the Kubernetes objects of the serving stacks as YAML (kubectl apply -f)."""
        from gpufleet.modules.k8s_objects import ImageError, serving_image

        fleet = load_fleet_or_exit(fleet_file)
        if region is not None:
            try:
                regions = [fleet.region(region)]
            except KeyError as exc:
                fail(str(exc.args[0]), EXIT_BAD_INPUT)
        else:
            regions = list(fleet.regions)
        try:
            ref = serving_image(fleet, image)
        except ImageError as exc:
            fail(f"{fleet_file}: {exc}", EXIT_BAD_INPUT)
        texts = {r.key: render_region(fleet, r, ref) for r in regions}
        if out is None:
            typer.echo("\n".join(texts.values()), nl=False)
            return
        if out.exists() and not out.is_dir():
            fail(f"--out {out} exists and is not a folder", EXIT_BAD_INPUT)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for key, text in texts.items():
                (out / f"{key}.yaml").write_text(text, encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write to {out}: {exc.strerror or exc}", EXIT_BAD_INPUT)
        typer.echo(f"wrote {len(texts)} file(s) to {out}/: {', '.join(f'{k}.yaml' for k in texts)}")
