"""``driftline reference …``: build a reference from a manifest, show one, list model layers."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from driftline.reference.artifact import ReferenceError
from driftline.schema import Event

app = typer.Typer(help="Reference artifacts", no_args_is_help=True)


def read_manifest(path: Path) -> Iterator[Event]:
    """Events of a JSONL manifest; a bad line stops the build with its line number."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield Event.model_validate_json(line)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "event"
                raise ReferenceError(f"{path}:{number}: {where}: {first['msg']}") from None


def _default_model() -> Path:
    from driftline.config import load_settings

    return load_settings().resolved_model_path()


@app.command("build")
def build(
    manifest: Annotated[Path, typer.Option(help="JSONL of reference events", exists=True)],
    out: Annotated[Path, typer.Option(help="Directory to write the artifact to")],
    model: Annotated[Path | None, typer.Option(help="ONNX model (default: DRIFTLINE_MODEL_PATH "
                                                    "or the demo model)")] = None,
    k: Annotated[int | None, typer.Option(help="Clusters (default round(sqrt(n/10)))")] = None,
    embedding_layer: Annotated[str | None, typer.Option(
        help="Graph output or intermediate tensor used as the embedding")] = None,
    pooling: Annotated[str, typer.Option(help="avg | max | none, for >2-D tensors")] = "avg",
    pca_dim: Annotated[int | None, typer.Option(help="Reduce to this many PCA axes")] = None,
    quantile: Annotated[float, typer.Option(help="OOD threshold quantile")] = 0.99,
    min_count: Annotated[int, typer.Option(help="Fewest samples for a baseline")] = 200,
    alpha: Annotated[float, typer.Option(help="Smoothing pseudo-counts per cluster")] = 0.5,
    exclude_window: Annotated[float | None, typer.Option(
        help="Seconds: leave out same-station neighbours this close in time (video)")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call")] = 32,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (0: all)")] = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Build a reference artifact from a manifest of reference events."""
    from driftline.consumers.embedder import Embedder, EmbedderConfig
    from driftline.reference.build import build_reference

    events = read_manifest(manifest)
    try:
        head = list(itertools.islice(events, 1))
        embedder = None
        if head and head[0].embedding is None:
            embedder = Embedder(EmbedderConfig.model_validate({
                "model_path": model or _default_model(), "batch_size": batch_size,
                "output_name": embedding_layer, "pooling": pooling,
                "intra_op_threads": threads}))
        ref = build_reference(itertools.chain(head, events), embedder, out, k=k, pca_dim=pca_dim,
                              quantile=quantile, min_count=min_count, alpha=alpha,
                              exclude_within_s=exclude_window, seed=seed, overwrite=overwrite,
                              source_name=manifest.name)
    except (ReferenceError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"driftline reference build: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote reference {ref.reference_id} to {out}")
    typer.echo(summary(ref.manifest))


@app.command("show")
def show(ref_dir: Annotated[Path, typer.Argument(help="Reference directory")]) -> None:
    """Print a readable summary: clusters, lift, baselines, thresholds, aggressors."""
    from driftline.reference.index import load_reference

    try:
        ref = load_reference(ref_dir)
    except ReferenceError as exc:
        typer.echo(f"driftline reference show: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary(ref.manifest))


@app.command("layers")
def layers(model: Annotated[Path, typer.Argument(help="ONNX model", exists=True)]) -> None:
    """List the tensors a model computes (choices for --embedding-layer)."""
    from driftline.consumers.embedder import list_tensors

    for name, shape in list_tensors(model):
        typer.echo(f"{name}\t{shape}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary(m: dict[str, Any]) -> str:
    """The manifest as text a person reads on a terminal."""
    emb, src = m["embedding"], m["source"]
    lines = [f"reference {m['reference_id']} (format {m['format_version']}), "
             f"created {m['created_at']}, {src['events']} events from {src['manifest']}"
             + (f", skipped {src['skipped']}" if src["skipped"] else "")]
    if emb["model"] is not None:
        d = emb["model"]
        lines.append(f"model {d['model_file']} sha256 {d['model_sha256'][:12]}…  layer "
                     f"{d['output_name']} {d['output_shape']} pooling {d['pooling']}  input "
                     f"{d['input_size'][0]}x{d['input_size'][1]} {d['layout']} {d['color_order']}")
    else:
        lines.append("precomputed embeddings, model versions: "
                     f"{', '.join(src['model_versions']) or 'unknown'}")
    pca = emb["pca"]
    lines.append(f"embedding dim {emb['input_dim']} → {emb['dim']}"
                 + (f" (PCA, {_pct(pca['explained_variance'])} variance)" if pca else ""))
    perf = m["performance"]
    aggressors = {a["cluster"]: a for a in perf["aggressors"]}
    lines += ["", f"clusters: K={m['clusters']['k']} ({m['clusters']['k_rule']})",
              f"  {'id':>3} {'size':>6} {'share':>6} {'errors':>7} {'loss':>7}  top lift"]
    for c in m["clusters"]["items"]:
        p = c["performance"]
        lift = ", ".join(f"{r['field']}={r['value']} ×{r['lift']:.1f} ({r['count']})"
                         for r in c["lift"][:3]) or "-"
        loss = "-" if p["mean_loss"] is None else f"{p['mean_loss']:.3g}"
        flag = "  AGGRESSOR" if c["id"] in aggressors else ""
        lines.append(f"  {c['id']:>3} {c['size']:>6} {_pct(c['share']):>6} "
                     f"{_pct(p['error_rate']):>7} {loss:>7}  {lift}{flag}")
    b = m["baselines"]
    lines += ["", f"baselines (min {b['min_count']} samples, alpha {b['alpha']}, OOD quantile "
                  f"{m['ood']['quantile']}):",
              f"  {'key':<36} {'n':>6} {'threshold':>9} {'ood rate':>8}  falls back to"]
    for key, item in b["items"].items():
        lines.append(f"  {key:<36} {item['n']:>6} {item['ood_threshold']:>9.4f} "
                     f"{_pct(item['ood_rate']):>8}  {item['parent'] or '-'}")
    lines += ["", f"performance: {perf['labelled']} labelled, error rate {_pct(perf['error_rate'])}"
                  f"; aggressors (alpha {perf['alpha']}): "
                  + (", ".join(f"cluster {c} ({'+'.join(a['reasons'])}, error "
                               f"{_pct(a['error_rate'])})" for c, a in aggressors.items())
                     or "none")]
    return "\n".join(lines)
