"""End-to-end embedder throughput vs bare onnxruntime, same model, batch and threads.

End to end: JPEG bytes (vtest frames, 768×576, quality 90) in → decode at reduced size → resize
→ normalise → onnxruntime → pooled, L2-normalised embedding out, all images in one call (decode
overlaps inference) and one batch per call (as the embed stage calls it: nothing to overlap
with), and one batch per call with the next call's first batch prefetched (``Embedder.prefetch``,
as the embed stage's loop does one batch ahead). Bare: ``session.run`` on pre-made float32 tensors
of the same frames, on the same model bytes the embedder runs (the graph cut to its output, as
:func:`driftline.consumers.onnx_graph.expose_tensor` makes it; the full file would also run the
classifier head). All legs run in one process, in interleaved repeats with the leg order
rotated from one repeat to the next (no leg always first, or always right after another), so
background load and warm caches hit them alike; medians are reported.

    .venv/bin/python benchmarks/embed_throughput.py            # writes results/embed_throughput.md
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _report import RunMeta
from PIL import Image

from driftline.consumers.embedder import Embedder, EmbedderConfig
from driftline.consumers.imaging import decode_image
from driftline.consumers.onnx_graph import expose_tensor
from driftline.demo.data import VTEST_VIDEO, fetch_demo_data, read_video_frames
from driftline.demo.model import build_demo_model

RESULTS = Path(__file__).parent / "results" / "embed_throughput.md"


def timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(images/s wall, CPU ms per image over all threads of this process)."""
    cpu0, t0 = sum(os.times()[:2]), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - t0, sum(os.times()[:2]) - cpu0
    return n / wall, 1e3 * cpu / n


def bench(model: Path, jpegs: list[bytes], threads: int, decode_threads: int | None, batch: int,
          repeats: int, spin: bool) -> dict[str, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    emb = Embedder(EmbedderConfig(model_path=model, batch_size=batch, intra_op_threads=threads,
                                  decode_threads=decode_threads, spin_wait=spin))
    # the embedder's own model bytes (cut to its output), same threads and spin policy
    model_bytes, out_name = expose_tensor(model, emb.output_name)
    bare = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    arrays = np.stack([decode_image(j, emb.input_size) for j in jpegs])
    # the embedder's own normalisation, done ahead of time
    tensors = [emb.preprocess(arrays[s:s + batch]) for s in range(0, len(arrays), batch)]

    def run_bare() -> None:
        for t in tensors:
            bare.run([out_name], {emb.input_name: t})

    def run_e2e() -> None:
        emb.embed_images(jpegs)

    def run_per_batch() -> None:
        for s in range(0, len(jpegs), batch):
            emb.embed_images(jpegs[s:s + batch])

    def run_streamed() -> None:  # one call per batch; the next call's first batch prefetched
        calls = [jpegs[s:s + batch] for s in range(0, len(jpegs), batch)]
        early = emb.prefetch(calls[0])
        for n, call in enumerate(calls):
            ahead = emb.prefetch(calls[n + 1]) if n + 1 < len(calls) else None
            emb.embed_images(call, early)
            early = ahead

    legs = (("bare", run_bare), ("e2e", run_e2e), ("e2e1", run_per_batch),
            ("e2es", run_streamed))
    for _, fn in legs:  # warm-up: thread pools, allocator, page cache
        fn()
    results: dict[str, list[float]] = {k: [] for name, _ in legs for k in (name, f"{name}_cpu")}
    for rep in range(repeats):
        for name, fn in legs[rep % len(legs):] + legs[:rep % len(legs)]:  # rotated order
            rate, cpu = timed(fn, len(jpegs))
            results[name].append(rate)
            results[f"{name}_cpu"].append(cpu)
    _, decode_cpu = timed(lambda: [decode_image(j, emb.input_size) for j in jpegs], len(jpegs))
    emb.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    out = {**med, "decode_cpu": decode_cpu, "threads": threads,
           "decode_threads": emb.decode_threads}
    for name, _ in legs:
        out[f"{name}_min"], out[f"{name}_max"] = min(results[name]), max(results[name])
        out[f"{name}_ratio"] = med[name] / med["bare"]
        out[f"{name}_pair"] = statistics.median(
            e / b for e, b in zip(results[name], results["bare"], strict=True))
        out[f"{name}_cpu_ratio"] = med["bare_cpu"] / med[f"{name}_cpu"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1, 1],
                        help="onnxruntime intra-op threads, one configuration each")
    parser.add_argument("--decode-threads", type=int, default=None,
                        help="embedder decode threads (default: the embedder's, one per core)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--spin", action="store_true",
                        help="onnxruntime workers busy-wait (both sides; the embedder's default "
                        "is off)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    meta = RunMeta()
    args = parser.parse_args()

    model = build_demo_model()
    frames = list(read_video_frames(fetch_demo_data() / VTEST_VIDEO))
    picks = np.linspace(0, len(frames) - 1, args.images).astype(int)
    jpegs = []
    for i in picks:
        buf = io.BytesIO()
        Image.fromarray(frames[i]).save(buf, format="JPEG", quality=args.quality)
        jpegs.append(buf.getvalue())
    rows = [bench(model, jpegs, t, args.decode_threads, args.batch, args.repeats,
                  args.spin) for t in args.threads]
    report = render(rows, args, jpegs, meta)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


def render(rows: list[dict[str, float]], args: argparse.Namespace, jpegs: list[bytes],
           meta: RunMeta) -> str:
    lines = [
        "# Embedder throughput: end to end vs bare onnxruntime", "",
        *meta.lines([f"onnxruntime {ort.__version__}"]),
        "- model: demo MobileNetV2 cut to its `embedding` output (1280-d), the same model "
        f"bytes in every leg; batch {args.batch}, inter-op 1, "
        f"spin-wait {'on' if args.spin else 'off'} (both sides)",
        f"- input: {len(jpegs)} vtest frames 768×576 as JPEG q{args.quality} "
        f"(mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB), decoded by libjpeg-turbo "
        "(simplejpeg) at DCT scale 1/2, then PIL bilinear to 224×224; "
        f"{rows[0]['decode_threads']:.0f} decode thread(s); with every core in onnxruntime "
        "they decode each batch between two runs, with fewer ORT threads than cores one of "
        "them decodes the next batch during the run",
        f"- {args.repeats} interleaved repeats, the leg order rotated each repeat; medians",
        "",
        "| ORT threads | leg | img/s median (min–max) | ratio | paired ratio | CPU ms/img | "
        "CPU ratio | decode CPU ms/img | CPU bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"bare": "bare onnxruntime", "e2e": "**end to end**, all images in one call",
             "e2e1": f"end to end, {args.batch} images per call, nothing prefetched",
             "e2es": f"end to end, {args.batch} images per call, the next call's first batch "
                     "prefetched (as the embed stage's loop one batch ahead; none on every core)"}
    for r in rows:
        bound = r["bare_cpu"] / (r["bare_cpu"] + r["decode_cpu"])
        for leg, label in names.items():
            ratio = f"{r[f'{leg}_ratio']:.2f}"
            lines.append(
                f"| {r['threads']:.0f} | {label} | {r[leg]:.1f} ({r[f'{leg}_min']:.0f}–"
                f"{r[f'{leg}_max']:.0f}) | {f'**{ratio}**' if leg == 'e2e' else ratio} | "
                f"{r[f'{leg}_pair']:.2f} | {r[f'{leg}_cpu']:.2f} | {r[f'{leg}_cpu_ratio']:.2f} | "
                + (f"{r['decode_cpu']:.2f} | {bound:.2f} |" if leg == "e2e" else " | |"))
    lines += ["", "Ratio = median leg / median bare; paired ratio = median over repeats of "
              "leg/bare measured in the same repeat; CPU ratio = bare CPU / leg CPU per image (all "
              "threads of the process, onnxruntime's spin-waiting included). When onnxruntime "
              "already uses every core, decoding competes for the same cores and the ratio "
              "cannot exceed the CPU bound = bare CPU / (bare CPU + decode CPU) per image. With "
              "fewer onnxruntime threads than cores (one embed consumer per core), decoding "
              "runs on an idle core."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
