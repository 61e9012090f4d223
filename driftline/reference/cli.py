"""``driftline reference …``: build a reference from a manifest, show one, list model layers."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError

from driftline.core.baselines import DEFAULT_CONFIDENCE, tail_rate_bound
from driftline.core.error_rates import P0_QUANTILE
from driftline.reference.artifact import MANIFEST, ReferenceError, check_out_dir
from driftline.reference.fallbacks import MISFIT_P, misfits
from driftline.reference.parameters import ParameterError, check_parameters
from driftline.runner import ood_detector_rate
from driftline.schema import Event

app = typer.Typer(help="Reference artifacts", no_args_is_help=True)


def read_manifest(path: Path, lines: list[int] | None = None) -> Iterator[Event]:
    """Events of a JSONL manifest (UTF-8, a byte-order mark allowed); a bad line stops the
    build with its line number. ``lines`` gets the line number of each event yielded."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ReferenceError(f"cannot read the manifest {path}: {exc.strerror}") from None
    with fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ReferenceError(f"{path}:{number}: not UTF-8 text (byte "
                                     f"{raw[exc.start]:#04x} at column {exc.start + 1}): a "
                                     "manifest is JSON lines") from None
            if not line.strip():
                continue
            try:  # without its line break: an error at its end is at its last column
                event = Event.model_validate_json(line.rstrip("\r\n"))
            except ValidationError as exc:
                raise ReferenceError(f"{path}:{number}: {_row_error(exc)}") from None
            if lines is not None:
                lines.append(number)
            yield event


def _row_error(exc: ValidationError) -> str:
    """Why a manifest line is no event: ``field: why``, or ``why`` for the line as a whole,
    without pydantic's ``Value error, `` and the ``line 1`` of a one-line JSON document."""
    first = exc.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    msg = re.sub(r" at line 1 column (\d+)$", r" at column \1", msg)
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {msg}" if where else msg


def _numbers(text: str | None, flag: str, cast: type[float] | type[int], example: str) -> Any:
    """The numbers of one option's value, written like ``example``, or None if not given."""
    if text is None:
        return None
    sep = "x" if "x" in example else ","
    try:
        values = tuple(cast(p) for p in text.lower().replace(sep, " ").split())
    except ValueError:
        values = ()
    if len(values) != len(example.split(sep)):
        raise typer.BadParameter(f"{text!r}: write it like {example}", param_hint=f"'{flag}'")
    return values


# EmbedderConfig fields and build_reference parameters set by flags of other names; the others
# are --field-name
_FLAG_OF = {"output_name": "--embedding-layer", "intra_op_threads": "--threads",
            "exclude_within_s": "--exclude-window"}


def _flag(field: str) -> str:
    return _FLAG_OF.get(field, "--" + field.replace("_", "-"))


def _with_flags(message: str) -> str:
    """An embedder error naming a setting (``set input_size``) also names its flag."""
    return re.sub(r"\b(input_name|input_size|layout|output_layout|pooling|scale|mean|std)\b",
                  lambda m: f"{m[1]} ({_flag(m[1])})", message)


def _bad_flag(exc: ParameterError) -> typer.BadParameter:
    value = f"{exc.value:g}" if isinstance(exc.value, float) else exc.value  # as typed: 0, not 0.0
    return typer.BadParameter(f"{value}: {exc.problem}", param_hint=f"'{_flag(exc.name)}'")


def _default_model() -> Path:
    """The model the settings name: DRIFTLINE_MODEL_PATH, else the demo model in the cache."""
    from driftline.config import load_settings
    from driftline.consumers.onnx_graph import ModelFileError

    settings = load_settings()
    path = settings.resolved_model_path()
    if path.exists():
        return path
    if settings.model_path is not None:
        raise ModelFileError(f"model not found: {path} (DRIFTLINE_MODEL_PATH); pass --model or "
                             "correct the setting")
    raise ModelFileError(f"no --model given and the demo model {path} is missing: pass --model, "
                         "set DRIFTLINE_MODEL_PATH, or run `driftline model build-demo`")


@app.command("build")
def build(
    manifest: Annotated[Path, typer.Option(help="JSONL of reference events", exists=True,
                                           dir_okay=False)],
    out: Annotated[Path, typer.Option(help="Directory to write the artifact to")],
    model: Annotated[Path | None, typer.Option(
        help="ONNX model (default: DRIFTLINE_MODEL_PATH or the demo model)", exists=True,
        dir_okay=False)] = None,
    k: Annotated[int | None, typer.Option(
        help="Clusters, at least 2 (default round(sqrt(n/10)))")] = None,
    embedding_layer: Annotated[str | None, typer.Option(
        help="Graph output or intermediate tensor used as the embedding")] = None,
    pooling: Annotated[Literal["avg", "max", "none"], typer.Option(
        help="How a >2-D tensor becomes a vector (none: flattened)")] = "avg",
    output_layout: Annotated[Literal["auto", "NC", "NCHW", "NHWC", "NLC", "NCL"], typer.Option(
        help="Axes of the embedding tensor, for pooling: NCHW/NHWC maps, NLC tokens×hidden "
             "(pooled over tokens), NCL; auto refuses to guess")] = "auto",
    input_name: Annotated[str | None, typer.Option(
        help="Model input fed the image (default: the only input)")] = None,
    input_size: Annotated[str | None, typer.Option(
        help="HxW, e.g. 224x224 (default: from the model; needed if its dims are dynamic)")
    ] = None,
    layout: Annotated[Literal["NCHW", "NHWC"] | None, typer.Option(
        help="Input layout (default: from the model's input shape)")] = None,
    color_order: Annotated[Literal["RGB", "BGR"] | None, typer.Option(
        help="Channel order the model expects [default: RGB]")] = None,
    scale: Annotated[float | None, typer.Option(
        help="Pixels are multiplied by this first [default: 1/255]")] = None,
    mean: Annotated[str | None, typer.Option(
        help="Per-channel mean subtracted after scaling, in the model's channel order "
             "(--color-order), e.g. 0.485,0.456,0.406 [default: ImageNet's, in that order]")
    ] = None,
    std: Annotated[str | None, typer.Option(
        help="Per-channel divisor after the mean, in the model's channel order, e.g. "
             "0.229,0.224,0.225 [default: ImageNet's, in that order]")] = None,
    fit: Annotated[Literal["stretch", "center_crop"] | None, typer.Option(
        help="Resize the whole frame, or keep aspect and crop the centre [default: stretch]")
    ] = None,
    l2_normalize: Annotated[bool, typer.Option(
        help="L2-normalise each embedding")] = True,
    pca_dim: Annotated[int | None, typer.Option(
        help="Reduce to this many PCA axes (1 up to the embedding's dimension)")] = None,
    quantile: Annotated[float, typer.Option(
        help="OOD threshold: this quantile of the reference distances, between 0 and 1")] = 0.99,
    min_count: Annotated[int, typer.Option(
        help="Fewest samples for a station or station×shift baseline (at least 1); a cell "
             "with fewer is judged against its parent's (warned about when that does not "
             "fit it)")] = 200,
    alpha: Annotated[float, typer.Option(
        help="Smoothing pseudo-counts per cluster, above 0")] = 0.5,
    max_labels: Annotated[int, typer.Option(
        min=1, help="Predicted labels with their own category; the rest share 'other'")] = 7,
    confidence_quantile: Annotated[float, typer.Option(
        help="Low confidence: a score below this quantile of the baseline's scores")] = 0.05,
    error_quantile: Annotated[float, typer.Option(
        help="Error-rate detector's reference rates: each cluster's posterior mean, all "
             "scaled so that they average to this quantile of the pooled error rate")
    ] = P0_QUANTILE,
    bound_confidence: Annotated[float, typer.Option(
        help="Probability that the bounds of each baseline's cluster mix, OOD rate, prediction "
             "mix and low-confidence rate, which the detectors judge against, hold for the "
             "reference sample drawn")
    ] = DEFAULT_CONFIDENCE,
    exclude_window: Annotated[float | None, typer.Option(
        help="Seconds (0 or more): leave out same-station neighbours this close in time "
             "(video)")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call")] = 32,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (0: all)")] = 0,
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the reference already in --out (only a directory holding a reference "
             "and nothing else; without it --out must be new or empty)")] = False,
) -> None:
    """Build a reference artifact from a manifest of reference events."""
    from driftline.consumers.embedder import Embedder, EmbedderConfig, ModelFileError
    from driftline.reference.build import build_reference

    try:
        check_parameters(k=k, pca_dim=pca_dim, quantile=quantile, min_count=min_count,
                         alpha=alpha, exclude_within_s=exclude_window, seed=seed,
                         max_labels=max_labels, confidence_quantile=confidence_quantile,
                         error_quantile=error_quantile, bound_confidence=bound_confidence)
    except ParameterError as exc:
        raise _bad_flag(exc) from None
    given = {"input_name": input_name, "layout": layout, "color_order": color_order,
             "scale": scale, "fit": fit,
             "input_size": _numbers(input_size, "--input-size", int, "224x224"),
             "mean": _numbers(mean, "--mean", float, "0.485,0.456,0.406"),
             "std": _numbers(std, "--std", float, "0.229,0.224,0.225")}
    try:  # checked before the manifest is read; the model path is resolved when images need it
        config = EmbedderConfig.model_validate({
            "model_path": model or Path("model.onnx"), "batch_size": batch_size,
            "output_name": embedding_layer, "pooling": pooling, "output_layout": output_layout,
            "l2_normalize": l2_normalize, "intra_op_threads": threads,
            **{k: v for k, v in given.items() if v is not None}})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise typer.BadParameter(first["msg"],
                                 param_hint=f"'{_flag(str(first['loc'][0]))}'") from None
    try:  # before anything is embedded
        check_out_dir(out, overwrite=overwrite, keep=[manifest, *([model] if model else [])],
                      overwrite_hint="pass --overwrite")
    except ReferenceError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--out'") from None
    lines: list[int] = []  # of each event, filled as it is read: skipped events name theirs
    events = read_manifest(manifest, lines)
    try:
        head = list(itertools.islice(events, 1))
        if not head:  # not '0 usable reference events ... (skipped: none)'
            raise ReferenceError(f"the manifest {manifest} holds no events (it is empty or "
                                 "its lines are blank)")
        embedder = None
        if head and head[0].embedding is not None:
            ignored = [_flag(k) for k, v in given.items() if v is not None]
            if ignored:  # refused rather than validated and then silently ignored
                raise ValueError(f"the manifest carries precomputed embeddings: "
                                 f"{', '.join(ignored)} apply only to images the model embeds")
        if head and head[0].embedding is None:
            try:
                embedder = Embedder(config.model_copy(
                    update={"model_path": model or _default_model()}))
            except ModelFileError:
                raise
            except ValueError as exc:
                raise ValueError(_with_flags(str(exc))) from None
        ref = build_reference(itertools.chain(head, events), embedder, out, k=k, pca_dim=pca_dim,
                              quantile=quantile, min_count=min_count, alpha=alpha,
                              exclude_within_s=exclude_window, seed=seed, overwrite=overwrite,
                              source_name=manifest.name, max_labels=max_labels,
                              confidence_quantile=confidence_quantile,
                              error_quantile=error_quantile, bound_confidence=bound_confidence,
                              lines=lines)
    except ParameterError as exc:  # one that only the data shows: --pca-dim
        raise _bad_flag(exc) from None
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
        text = summary(load_reference(ref_dir).manifest)
    except ReferenceError as exc:  # the cluster entries' fields are named (reference.entries)
        typer.echo(f"driftline reference show: {exc}", err=True)
        raise typer.Exit(2) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        typer.echo(f"driftline reference show: {Path(ref_dir) / MANIFEST}: not what a build "
                   f"writes ({type(exc).__name__}: {exc})", err=True)
        raise typer.Exit(2) from None
    typer.echo(text)


@app.command("layers")
def layers(model: Annotated[Path, typer.Argument(help="ONNX model", exists=True,
                                                  dir_okay=False)]) -> None:
    """List the tensors a model computes (choices for --embedding-layer)."""
    from driftline.consumers.embedder import ModelFileError, list_tensors

    try:
        tensors = list_tensors(model)
    except ModelFileError as exc:
        typer.echo(f"driftline reference layers: {exc}", err=True)
        raise typer.Exit(2) from None
    for name, shape in tensors:
        typer.echo(f"{name}\t{shape}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary(m: dict[str, Any]) -> str:
    """The manifest as text a person reads on a terminal."""
    emb, src = m["embedding"], m["source"]
    lines = [f"reference {m['reference_id']} (format {m['format_version']}), "
             f"created {m['created_at']}, {src['events']} events from {src['manifest']}"]
    first = src.get("first_skipped", {})  # absent from references built before it was kept
    lines += [f"skipped {n} {reason}" + (f", the first: {first[reason]}" if reason in first else "")
              for reason, n in src["skipped"].items()]
    if emb["model"] is not None:
        d = emb["model"]
        lines.append(f"model {d['model_file']} sha256 {d['model_sha256'][:12]}…  layer "
                     f"{d['output_name']} {d['output_shape']} {d.get('output_layout', 'auto')} "
                     f"pooling {d['pooling']}  input "
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
              f"  {'id':>3} {'size':>6} {'share':>6} {'errors':>7} {'expect':>6} {'p0':>6} "
              f"{'loss':>7}  top lift"]
    for c in m["clusters"]["items"]:
        p = c["performance"]
        lift = ", ".join(f"{r['field']}={r['value']} ×{r['lift']:.1f} ({r['count']})"
                         for r in c["lift"][:3]) or "-"
        loss = "-" if p["mean_loss"] is None else f"{p['mean_loss']:.3g}"
        flag = "  AGGRESSOR" if c["id"] in aggressors else ""
        errors = "-" if p["error_rate"] is None else f"{p['errors']}/{p['labelled']}"
        lines.append(f"  {c['id']:>3} {c['size']:>6} {_pct(c['share']):>6} {errors:>7} "
                     f"{_pct(p.get('expected_error')):>6} {_pct(p.get('error_p0')):>6} "
                     f"{loss:>7}  {lift}{flag}")
    b = m["baselines"]
    confidence = b.get("bound_confidence", DEFAULT_CONFIDENCE)
    lines += ["", f"baselines (min {b['min_count']} samples, alpha {b['alpha']}, OOD quantile "
                  f"{m['ood']['quantile']}; detectors judge against bounds at confidence "
                  f"{confidence}):",
              f"  {'key':<36} {'n':>6} {'threshold':>9} {'ood rate':>8} {'detector':>8}  "
              "smoothed toward"]
    for key, item in b["items"].items():
        bound = ood_detector_rate(key, item, confidence)  # as the detect stage judges
        lines.append(f"  {key:<36} {item['n']:>6} {item['ood_threshold']:>9.4f} "
                     f"{_pct(item['ood_rate']):>8} {_pct(bound):>8}  {item['parent'] or '-'}")
    lines += _fallbacks(b)
    lines += _predictions(m.get("predictions"), confidence)
    lines += ["", f"performance: {perf['labelled']} labelled, error rate {_pct(perf['error_rate'])}"
                  f"; aggressors (alpha {perf['alpha']}): "
                  + (", ".join(f"cluster {c} ({'+'.join(a['reasons'])}, error "
                               f"{_pct(a['error_rate'])})" for c, a in aggressors.items())
                     or "none")]
    prior = perf.get("error_prior")
    if prior:
        lines.append(f"expected error per cluster (expect): errors shrunk toward "
                     f"{_pct(prior['rate'])} with a prior worth {prior['strength']:.0f} "
                     f"labelled events; the error-rate detector's reference (p0): "
                     + ("scaled to the pooled rate's " if prior.get("p0_method") == "pooled"
                        else "its ") + f"{prior['p0_quantile']:g} quantile")
    return "\n".join(lines)


def _fallbacks(b: dict[str, Any], show: int = 10) -> list[str]:
    """The cells judged against a parent's baseline; loudly those it does not fit."""
    cells = b.get("fallbacks")  # absent from references built before it was recorded
    if not cells:
        return []
    lines = [f"  {len(cells)} station / station×shift cells have fewer than {b['min_count']} "
             "reference events: no baseline of their own, their events are judged against "
             "their parent's"]
    bad = misfits(cells)
    if bad:
        lines += [f"  WARNING: {len(bad)} of them hold another cluster mix than the baseline "
                  f"they are judged against (G-test p < {MISFIT_P:g}): their unchanged events "
                  "will look like drift and raise alarms. Give them more reference events, or "
                  "lower --min-count to their n so that they get their own baselines:"]
        lines += [f"    {key:<34} {cells[key]['n']:>6}  judged against "
                  f"{cells[key]['judged_against']}, p = {cells[key]['p_value']:.2g}"
                  for key in bad[:show]]
        if len(bad) > show:
            lines.append(f"    … and {len(bad) - show} more (the manifest's baselines.fallbacks)")
    return lines


def _predictions(section: dict[str, Any] | None, confidence: float) -> list[str]:
    """The prediction baselines: label mix and low-confidence cut per baseline."""
    if not section:
        return ["", "predictions: none in the reference (prediction-mix and confidence "
                    "detectors do not run)"]
    labels = [*section["labels"], "(other)"]
    lines = ["", f"predictions: {section['events']} events, labels {', '.join(labels)} "
                 f"(at most {section['max_labels']} + other); low confidence: score below the "
                 f"{section['low_confidence_quantile']:g} quantile (min {section['min_count']} "
                 f"predictions, alpha {section['alpha']}):",
             f"  {'key':<36} {'n':>6} {'cut':>7} {'low':>6} {'detector':>8}  label mix  "
             "smoothed toward"]
    confidence = section.get("bound_confidence", confidence)
    for key, item in section["items"].items():
        mix = " ".join(f"{lb}={_pct(p)}" for lb, p in zip(labels, item["p"], strict=True))
        bound = item.get("low_confidence_rate_bound")
        if bound is None and item.get("low_confidence_count") is not None:  # as detect does
            bound = tail_rate_bound(item["n"], item["low_confidence_count"], confidence)
        lines.append(f"  {key:<36} {item['n']:>6} {item['low_confidence_cut']:>7.4f} "
                     f"{_pct(item['low_confidence_rate']):>6} {_pct(bound):>8}  {mix}  "
                     f"{item['parent'] or '-'}")
    return lines
