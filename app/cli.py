"""`vps`: serve, build-index, export-model, grocery-catalogue."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError

from app.service.config import Settings
from app.service.logs import configure_logging

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Visual product search")
log = logging.getLogger("app.cli")


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, envvar="VPS_WORKERS", help="Worker processes")] = 1,
    index_dir: Annotated[Path | None, typer.Option(help="Overrides VPS_INDEX_DIR")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Overrides VPS_MODEL_DIR")] = None,
) -> None:
    """Serve the CURRENT index version over HTTP."""
    # The service parallelises across requests (pool threads, worker processes). BLAS and OpenMP thread pools
    # inside one request only fight them for the cores: under contention OpenBLAS spinning made a numpy fit 8x
    # slower here. Set before numpy, faiss or onnxruntime are imported (workers inherit the environment).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

    # Options travel as VPS_* variables so that every worker process reads the same settings.
    if index_dir is not None:
        os.environ["VPS_INDEX_DIR"] = str(index_dir)
    if model_dir is not None:
        os.environ["VPS_MODEL_DIR"] = str(model_dir)
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level)
    from app.service.metrics import MULTIPROC_ENV, MetricsDirError, prepare_multiprocess_dir

    metrics_dir = os.environ.get(MULTIPROC_ENV)
    if workers > 1 and not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="vps-metrics-")
    if metrics_dir:
        # Every worker maps the same index files (shared page cache, no copy per worker); metrics from all of
        # them are aggregated through files in one directory, emptied here so a restart serves no stale counts.
        try:
            prepare_multiprocess_dir(Path(metrics_dir), workers)
        except MetricsDirError as exc:
            typer.echo(f"cannot start: {exc}", err=True)
            raise typer.Exit(3) from None
        os.environ[MULTIPROC_ENV] = metrics_dir
        log.info("multiprocess metrics", extra={"dir": metrics_dir, "workers": workers})
    from app.service.server import run

    # uvicorn with head limits and the request cap (app/service/server.py); every worker reads the same settings.
    run(host=host, port=port, workers=workers)


@cli.command("build-index")
def build_index_cmd(
    catalogue: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="CSV: sku,category,image[,title,...]")],
    images_root: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Root of the image paths")],
    out: Annotated[Path, typer.Option(help="Index directory (versions + CURRENT)")] = Path("index_data"),
    model: Annotated[Path, typer.Option(help="Model directory")] = Path("models/grocery-lite0-ms512"),
    backend: Annotated[str, typer.Option(help="faiss or hnswlib")] = "faiss",
    m: Annotated[int, typer.Option("--M", min=4, max=128, help="HNSW M")] = 32,
    ef_construction: Annotated[int, typer.Option(min=8, max=4096)] = 200,
    ef_search: Annotated[int, typer.Option(min=8, max=4096)] = 64,
    batch_size: Annotated[int, typer.Option(min=1, max=512)] = 32,
    threads: Annotated[int, typer.Option(min=1, max=64)] = 2,
    calibration_queries: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="CSV of real query photos of catalogue SKUs for calibration"),
    ] = None,
    calibration_root: Annotated[Path | None, typer.Option(exists=True, file_okay=False)] = None,
    max_routing_loss: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Recall@1 and @5 the probing policy may lose (0.005: half a point)")
    ] = 0.005,
    exhaustive_below: Annotated[
        int, typer.Option(min=0, help="Search every shard when the index holds at most this many vectors (0: never)")
    ] = 1000,
) -> None:
    """Embed a catalogue and publish a new index version."""
    from app.offline.build.build_index import BuildOptions, build_index

    configure_logging("INFO")
    if backend not in ("faiss", "hnswlib"):
        raise typer.BadParameter("backend must be faiss or hnswlib", param_hint="--backend")
    chosen: Literal["faiss", "hnswlib"] = "faiss" if backend == "faiss" else "hnswlib"
    options = BuildOptions(
        backend=chosen,
        M=m,
        ef_construction=ef_construction,
        ef_search=ef_search,
        batch_size=batch_size,
        threads=threads,
        max_routing_loss=max_routing_loss,
        exhaustive_below=exhaustive_below,
    )
    result = build_index(
        catalogue,
        images_root,
        out,
        model,
        options,
        calibration_queries=calibration_queries,
        calibration_root=calibration_root,
    )
    m_ = result.manifest
    typer.echo(
        f"built {m_.version}: {m_.n_items} images in {len(m_.categories)} categories, "
        f"{len(result.problems)} skipped (see {result.version_dir / 'build_report.json'})"
    )
    typer.echo("router: " + result.router_report.summary())
    for p in result.problems[:20]:
        typer.echo(f"  skipped line {p.line}: {p.image}: {p.reason}", err=True)


@cli.command("export-model")
def export_model_cmd(
    out: Annotated[Path, typer.Option(help="Model directory to write")] = Path("models/efficientnet-lite0-imagenet"),
    checkpoint: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A `vps train` best.pt; default: ImageNet")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name for the card (default: the directory name)")] = None,
    version: Annotated[str, typer.Option(help="Model version for the card")] = "1.0.0",
) -> None:
    """Export an embedding model to ONNX with its model card (needs the `train` extra): ImageNet
    EfficientNet-Lite0, or a fine-tuned checkpoint from `vps train`."""
    from app.offline.export.export_model import export_checkpoint, export_imagenet_model

    configure_logging("INFO")
    if checkpoint is None:
        card = export_imagenet_model(out)
    else:
        card = export_checkpoint(checkpoint, out, name or out.name, version)
    typer.echo(f"exported {out / 'model.onnx'} sha256={card.sha256}")


@cli.command()
def train(
    catalogue: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Training catalogue CSV")],
    images_root: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints, history.json")],
    val_queries: Annotated[Path | None, typer.Option(help="Query CSV for validation (other photos)")] = None,
    studio_catalogue: Annotated[Path | None, typer.Option(help="Studio-image catalogue CSV, also validated")] = None,
    loss: Annotated[str, typer.Option(help="ms, proxy_anchor or triplet")] = "ms",
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    p: Annotated[int, typer.Option("--P", min=2, help="SKUs per batch")] = 16,
    k: Annotated[int, typer.Option("--K", min=2, help="Photos per SKU in a batch")] = 4,
    dim: Annotated[int, typer.Option(min=8, max=2048)] = 512,
    train_size: Annotated[int, typer.Option(min=64, max=512)] = 192,
    freeze_blocks: Annotated[int, typer.Option(min=0, max=16)] = 8,
    lr: Annotated[float, typer.Option()] = 3e-4,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(min=1, max=64)] = 2,
    steps_per_epoch: Annotated[int | None, typer.Option(min=1)] = None,
    eval_every: Annotated[int, typer.Option(min=1)] = 1,
    category_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the coarse-category term (0: SKU metric loss only)")
    ] = 0.0,
) -> None:
    """Fine-tune the embedding model by deep metric learning (needs the `train` extra). Resumes from OUT/last.pt."""
    from app.offline.train.train_embedding import TrainConfig
    from app.offline.train.train_embedding import train as run_training

    configure_logging("INFO")
    if loss not in ("ms", "proxy_anchor", "triplet"):
        raise typer.BadParameter("loss must be ms, proxy_anchor or triplet", param_hint="--loss")
    cfg = TrainConfig(
        catalogue=catalogue,
        images_root=images_root,
        out_dir=out,
        val_queries=val_queries,
        studio_catalogue=studio_catalogue,
        loss=loss,  # type: ignore[arg-type]
        epochs=epochs,
        P=p,
        K=k,
        dim=dim,
        train_size=train_size,
        freeze_blocks=freeze_blocks,
        lr=lr,
        seed=seed,
        threads=threads,
        steps_per_epoch=steps_per_epoch,
        eval_every=eval_every,
        category_weight=category_weight,
    )
    state = run_training(cfg)
    typer.echo(f"best: {state['best']}")


@cli.command("quantize-model")
def quantize_model_cmd(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="fp32 model directory")],
    calibration: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Catalogue CSV of photos")],
    images_root: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Directory for the int8 model")],
    n_images: Annotated[int, typer.Option(min=8, max=10000)] = 256,
) -> None:
    """Static int8 (QDQ) quantisation calibrated on catalogue photos."""
    from app.offline.export.quantize import quantize_model

    configure_logging("INFO")
    card = quantize_model(model, calibration, images_root, out, n_images=n_images)
    typer.echo(f"quantised {out / 'model.onnx'} sha256={card.sha256}")


@cli.command()
def evaluate(
    index: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Index directory (with CURRENT)")],
    queries: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Query CSV: sku,category,image")],
    images_root: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="Directory for report.json and report.html")],
    model: Annotated[Path | None, typer.Option(help="Model directory (default: VPS_MODEL_DIR)")] = None,
) -> None:
    """Measure an index with query photos; writes report.json and a self-contained report.html
    (needs the `eval` extra for the plots)."""
    from app.offline.evaluate.job import evaluate_index

    configure_logging("WARNING")
    report = evaluate_index(index, model or Settings().model_dir, queries, images_root, out)
    r = report["retrieval"]
    typer.echo(
        f"recall@1={r['recall@1']:.4f} recall@5={r['recall@5']:.4f} router top-1={report['routing']['top1_accuracy']} "
        f"-> {out / 'report.html'}"
    )


@cli.command("grocery-catalogue")
def grocery_catalogue_cmd(
    dataset: Annotated[Path, typer.Option(exists=True, file_okay=False, help="GroceryStoreDataset root")],
    split: Annotated[str, typer.Option(help="train, val or iconic")],
    out: Annotated[Path, typer.Option(help="CSV to write")],
) -> None:
    """Write a catalogue CSV for one split of the GroceryStoreDataset."""
    from app.offline.datasets.catalogue import write_catalogue
    from app.offline.datasets.grocery import split_rows

    if split not in ("train", "val", "iconic"):
        raise typer.BadParameter("split must be train, val or iconic", param_hint="--split")
    rows = split_rows(dataset, split)
    write_catalogue(out, rows)
    typer.echo(f"wrote {len(rows)} rows to {out}")


def main() -> None:
    cli()
