"""ddps command line: argument parsing and nothing else; the work is in the engine."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ddps.config.presets import PRESETS
from ddps.config.schema import EVAL_SPLITS
from ddps.errors import DDPSError
from ddps.storage import STORAGE_VAR, location, use_storage

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


PRESET_HELP = " | ".join(PRESETS) + " (ddps/config/presets.py; default: %(default)s)"


def _config_args(p: argparse.ArgumentParser, preset: str | None = "cpu") -> None:
    p.add_argument("--preset", default=preset, help=PRESET_HELP)
    p.add_argument("--config", help="experiment YAML; its presets.<preset> overrides the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train_base.iters=100")
    p.add_argument("--data-root", help="dataset root (for fashion-scenes: the Fashion-MNIST IDX folder; "
                                       "also $DDPS_FASHION_MNIST)")


GPU_HELP = "compute on one GPU (the first visible); one line when none is visible"
CLUSTER_GPU_HELP = ("one GPU per Ray Train worker (nccl) and per evaluation; on a local Ray, one line when this "
                    "machine has none or fewer than --workers (on a cluster without GPU nodes yet, the work waits "
                    "for them)")


VERBOSE_HELP = ("show the workers' own output (Ray Train, Tune) and Ray's and MLflow's start-up lines here too "
                "(always in Ray's logs)")


def _device_args(p: argparse.ArgumentParser, gpu_help: str = GPU_HELP) -> None:
    """Where the command computes and keeps what it trains (every command that computes): --gpu, --no-tf32,
    --storage."""
    p.add_argument("--gpu", action="store_true", help=gpu_help)
    p.add_argument("--no-tf32", action="store_true", help="full float32 matmuls and convolutions on the GPU "
                                                          "(TF32 is on by default; nothing changes on the CPU)")
    p.add_argument("--storage", metavar="URI", help="where checkpoints, feature caches and Ray Train's run state "
                                                    "live for every node: s3://bucket/prefix (endpoint: "
                                                    "?endpoint_override=http://host:port or AWS_ENDPOINT_URL), "
                                                    "gs://..., or an absolute folder (default: $DDPS_STORAGE, "
                                                    "else $DDPS_HOME)")


def _device(args) -> str:
    """The device of a single-process command, set up before any compute: "cuda" with --gpu (one line when no
    GPU is visible), else "cpu"; TF32 unless --no-tf32."""
    from ddps.engine.device import setup
    return setup(args.gpu, tf32=not args.no_tf32)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    """How trainings spread over Ray Train workers, and where MLflow is (pipeline and sweep)."""
    p.add_argument("--workers", type=int, default=2, help="data-parallel Ray Train workers per training (default: 2)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    _device_args(p, CLUSTER_GPU_HELP)
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before a training fails")
    p.add_argument("--checkpoint-every", type=int, default=500, help="iterations between training states")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite in $DDPS_HOME)")
    _system_metrics_arg(p)


def _system_metrics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-system-metrics", action="store_true", help="no MLflow system metrics (CPU, memory, GPU) "
                                                                    "on the training runs")


def _cluster(args):
    from ddps.orchestration.ray_train import Cluster
    return Cluster(workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                   max_failures=args.max_failures, checkpoint_every=args.checkpoint_every, tf32=not args.no_tf32,
                   system_metrics=not args.no_system_metrics)


def _resolve(args):
    from ddps.config import resolve
    from ddps.errors import ConfigError
    experiment = getattr(args, "experiment", None)
    if experiment and args.config and experiment != args.config:
        raise ConfigError(f"two experiment files given ({experiment} and --config {args.config}); give one")
    args.config = args.config or experiment
    return resolve(args.preset, args.config, _overrides(args))


def _overrides(args) -> list[str]:
    """The --set overrides, led by data.root=<--data-root> when given (so an explicit --set data.root wins)."""
    return ([f"data.root={args.data_root}"] if args.data_root else []) + list(args.overrides)


def cmd_data_build(args) -> int:
    from ddps.data import fashion_scenes
    from ddps.errors import DataError
    cfg = _resolve(args)
    if args.dataset != "fashion-scenes":
        raise DataError(f"only fashion-scenes is built; {args.dataset!r} is read in place "
                        f"(set data.dataset and data.root)")
    spec = fashion_scenes.spec_from(cfg.data)
    path = fashion_scenes.build(spec, cfg.data.root or None, force=args.force)
    print(fashion_scenes.summary(path, spec))
    return 0


def check_inputs(cfg, dataset: bool = True) -> None:
    """Before any compute: the dataset read in place is there, and so are the published weights the base names
    (base.pretrained, base.encoder_weights): else one line saying what to fetch and where."""
    from ddps.data.datasets import check_dataset
    from ddps.segmentors.pretrained import check_weights
    if dataset:
        check_dataset(cfg.data)
    check_weights(cfg.base)


def _print_checkpoint(path) -> None:
    """Write the checkpoint's metrics beside it as <name>.json and print both paths."""
    from ddps.segmentors.checkpoint import read_checkpoint
    metrics = read_checkpoint(path)["metrics"]
    metrics_path = location(path).with_suffix(".json")
    metrics_path.write_text(json.dumps(metrics, indent=2))
    print(f"checkpoint: {path}\nmetrics: {metrics_path}")


def cmd_train_base(args) -> int:
    cfg = _resolve(args)  # a bad value is one line before torch is even imported
    from ddps.engine.train_base import fit
    device = _device(args)
    check_inputs(cfg)  # the dataset read in place, then the published weights: one line before any compute
    path = fit(cfg, checkpoint=args.out, device=device, force=args.force, checkpoint_every=args.checkpoint_every)
    _print_checkpoint(path)
    return 0


def cmd_train(args) -> int:
    cfg = _resolve(args)  # a bad value is one line before torch is even imported
    from ddps.engine import train_base, train_refiner
    from ddps.engine.reporter import ConsoleReporter
    device = _device(args)
    train_refiner.check_trainable(cfg)
    base = args.base
    if not base:
        base = train_base.default_checkpoint(cfg)
        if not base.exists() and cfg.base.pretrained:
            check_inputs(cfg, dataset=False)
            print(f"no base checkpoint for this config yet: importing base.pretrained={cfg.base.pretrained} first; "
                  f"pass --base to use another")
        elif not base.exists():
            print(f"no base checkpoint for this config yet: training it first ({cfg.base.arch}-{cfg.base.backbone},"
                  f" {cfg.train_base.iters} iterations); pass --base to use another")
        base = train_base.fit(cfg, device=device, checkpoint_every=args.checkpoint_every)
    path = train_refiner.fit(cfg, base, reporter_factory=lambda stage, iters: ConsoleReporter(stage, iters),
                             out_dir=args.out, device=device, force=args.force,
                             checkpoint_every=args.checkpoint_every)
    _print_checkpoint(path)
    return 0


def _check_exists(checkpoint: str) -> None:
    """A local checkpoint that is not there: one line before torch is even imported (a URI is read later)."""
    from ddps.errors import CheckpointError
    from ddps.storage import is_uri
    if not checkpoint.startswith("runs:/") and not is_uri(checkpoint) and not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")


def cmd_eval(args) -> int:
    device = _device(args)
    _check_exists(args.checkpoint)
    from ddps.engine.evaluate_checkpoint import evaluate_checkpoint
    print(evaluate_checkpoint(args.checkpoint, args.overrides, multiscale=not args.no_ms, preset=args.preset,
                              all_steps=args.all_steps, split=args.split, as_json=args.json, device=device))
    return 0


def cmd_refine(args) -> int:
    from ddps.errors import DataError
    device = _device(args)
    missing = next((image for image in args.images if not Path(image).is_file()), None)
    if missing:  # before the model is loaded
        raise DataError(f"image {missing} does not exist")
    _check_exists(args.checkpoint)
    from ddps.engine.refine_images import refine_images
    checkpoint = args.checkpoint
    if checkpoint.startswith("runs:/"):  # a refiner logged by `ddps pipeline`
        from ddps.orchestration.tracking import Tracker
        checkpoint = Tracker(args.tracking_uri).download(checkpoint)
    for path in refine_images(args.images, checkpoint, args.out, steps=args.steps, seed=args.seed, device=device,
                              overrides=args.overrides):
        print(path)
    return 0


def cmd_import_official(args) -> int:
    from ddps.refiner.official import import_official
    import_official(args.checkpoint, args.base, args.out, dataset=args.dataset)
    return 0


def cmd_pipeline(args) -> int:
    run_pipeline(_resolve(args), _cluster(args), args.tracking_uri, args.mlflow_experiment, verbose=args.verbose)
    return 0


def quiet_libraries() -> None:
    """MLflow's start-up lines (creating a store's tables) out of the console (--verbose keeps them): MLflow sets
    its loggers' level from MLFLOW_LOGGING_LEVEL when it is first imported, and again in each Ray worker."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def run_pipeline(cfg, cluster, tracking_uri=None, experiment=None, verbose: bool = False) -> dict:
    """The pipeline on the cluster in RAY_ADDRESS, else on an in-process Ray; writes its report (from
    MLflow, as ``ddps report`` does) and prints its table. The console shows ddps's lines and one progress line
    per training (all of it also in $DDPS_HOME/logs/<experiment>-<hash8>.log); with ``verbose``, the workers'
    own output and Ray's and MLflow's start-up lines too."""
    from ddps.orchestration.pipeline import Pipeline, pipeline_hash
    from ddps.orchestration.plan import chain_of, eval_hash
    from ddps.orchestration.progress import Console
    from ddps.orchestration.runtime import check_gpu, ensure_ray
    from ddps.paths import cache_dir
    from ddps.report.write import write_report
    from ddps.engine.train_refiner import check_trainable
    check_gpu(cluster)  # --gpu on a machine without one: one line before MLflow and Ray start
    check_trainable(cfg)
    check_inputs(cfg)  # before MLflow and Ray: a missing dataset or weights file is one line
    if not verbose:
        quiet_libraries()
    name = experiment or f"ddps-{cfg.data.dataset}"
    console = Console(cache_dir("logs") / f"{name}-{pipeline_hash(cfg)[:8]}.log")
    try:
        console.say(f"log: {console.log_file}")
        pipeline = Pipeline(cfg, cluster, tracking_uri=tracking_uri, experiment=experiment, log=console.say,
                            console=console)
        ensure_ray(cluster, log_to_driver=verbose, log=console.say)
        summary = pipeline.run()
    finally:
        console.close()
    name = pipeline.experiment_name
    out = cache_dir("reports") / name
    write_report(pipeline.tracker, [name], out, evaluations={eval_hash(cfg, chain_of(cfg))}, parquet=False,
                 log=lambda line: None)
    table = (out / f"{name}.md").read_text().split("\n## Figures")[0]  # the table, without its figure links
    print(table.split("\n", 4)[-1].rstrip())  # below the title and the header line
    print(f"report: {out}/{name}.md (figures in {out}/figures)")
    from ddps.orchestration.tracking import runs_url
    print(f"MLflow: {pipeline.tracker.uri} (experiment {name}); to browse it: ddps ui, then open "
          f"{runs_url('http://127.0.0.1:5000', pipeline.experiment_id)}")
    return summary


def cmd_sweep(args) -> int:
    from ddps.data.datasets import check_dataset
    from ddps.errors import ConfigError
    from ddps.segmentors.pretrained import check_weights
    from ddps.orchestration.estimates import describe
    from ddps.orchestration.plan import experiment_files, load_experiment, plan
    if args.all == bool(args.experiments):
        raise ConfigError("give experiment files or --all (every file in experiments/), not both and not neither")
    if not args.verbose:  # before the store is first read (and created, by a real run): no MLflow start-up lines
        quiet_libraries()
    if not args.dry_run:  # --gpu on a machine without one: one line before the plan and MLflow are read
        from ddps.orchestration.runtime import check_gpu
        check_gpu(_cluster(args))
    files = experiment_files() if args.all else args.experiments
    from ddps.config.load import parse_set
    from ddps.orchestration.plan import parse_cell_set
    scoped = parse_cell_set(args.cell_overrides)
    experiments = [load_experiment(f) for f in files]
    for axis, label, _ in scoped:
        if not any(axis == a.name for e in experiments for a in e.axes):
            raise ConfigError(f"--cell-set: no experiment given has an axis {axis!r}; their axes: "
                              f"{', '.join(sorted({a.name for e in experiments for a in e.axes}))}")
    plans = [plan(e, args.preset, parse_set(_overrides(args)), scoped) for e in experiments]
    from ddps.orchestration.sweep import finished_cells
    from ddps.rates import default_path, read_rates
    rates = Path(args.gpu_rates) if args.gpu_rates else default_path()
    print(describe(plans, finished_cells(plans, args.tracking_uri), read_rates(rates), str(rates)))
    if args.dry_run:
        for p in plans:
            print(f"\n{p.experiment.title} ({p.preset}): {len(p.cells)} cells, {len(p.invalid)} not valid")
            for t in p.trainings:
                if t.imported:  # published weights: an import, no training and no time estimated
                    state = "done" if t.path.exists() else "to import"
                    print(f"  {t.step:<9} {t.hash[:12]}  imported (from {t.imported}), not trained  {state}")
                    continue
                state = "done" if t.path.exists() else "to train"
                print(f"  {t.step:<9} {t.hash[:12]}  {t.iters} it x {t.batch_size}  {state}")
        return 0
    for p in plans:  # a dataset read in place, and the published weights named, must be there before any compute
        for data in {c.cfg.data for c in p.cells}:
            check_dataset(data)
        for base in {c.cfg.base for c in p.cells}:
            check_weights(base)
    from ddps.orchestration.sweep import run_sweeps
    run_sweeps(plans, _cluster(args), args.tracking_uri, verbose=args.verbose)
    from ddps.orchestration.tracking import runs_url
    print(f"MLflow: one experiment per table; browse with ddps ui, then open {runs_url('http://127.0.0.1:5000')}")
    return 0


def cmd_report(args) -> int:
    from ddps.orchestration.tracking import Tracker, resolve_tracking_uri, sqlite_path
    from ddps.report.write import ReportError, write_report
    if args.all == bool(args.experiments):
        raise ReportError("give --experiment NAME (repeatable) or --all, not both and not neither")
    uri = resolve_tracking_uri(args.tracking_uri)
    db = sqlite_path(uri)
    if db and not db.exists():
        raise ReportError(f"no MLflow store at {db}; run a sweep or `make demo` first, "
                          f"or give --tracking-uri")
    written = write_report(Tracker(uri), None if args.all else args.experiments, args.out,
                           with_figures=not args.no_figures, log_figures=not args.no_log,
                           parquet=not args.no_parquet, split=args.split)
    if len(written.tables) == 1:
        print(next(p for p in written.files if p.suffix == ".md").read_text().split("\n## Figures")[0].rstrip())
    print(f"report: {Path(args.out) / 'index.md'}")
    return 0


def cmd_ui(args) -> int:
    from ddps.orchestration.runtime import serve_ui
    return serve_ui(args.host, args.port, args.tracking_uri)


def cmd_demo(args) -> int:
    """The embedded default: the dataset, then the whole pipeline on a local Ray with 2 Ray Train workers
    (base -> stage 1 -> stage 2 -> evaluation, tracked in the SQLite MLflow store), then its table."""
    from ddps.config import resolve
    from ddps.data import fashion_scenes
    from ddps.orchestration.ray_train import Cluster
    from ddps.orchestration.runtime import check_gpu
    cfg = resolve(args.preset, None, args.overrides)
    cluster = Cluster(workers=args.workers, cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpu,
                      tf32=not args.no_tf32, system_metrics=not args.no_system_metrics)
    check_gpu(cluster)  # before the dataset is built
    if cfg.data.dataset == "fashion-scenes":
        print("== 1/2 build fashion-scenes")
        spec = fashion_scenes.spec_from(cfg.data)
        print(fashion_scenes.summary(fashion_scenes.build(spec, cfg.data.root or None), spec))
    else:
        print(f"== 1/2 dataset {cfg.data.dataset} at {cfg.data.root or '(data.root not set)'}")
    workers = f"{args.workers} GPU workers" if args.gpu else f"{args.workers} workers"
    print(f"== 2/2 pipeline (preset {cfg.preset}): base {cfg.base.arch}-{cfg.base.backbone} -> DDPS stage 1 -> "
          f"stage 2 -> evaluation, on Ray Train with {workers}, tracked in MLflow")
    run_pipeline(cfg, cluster, verbose=args.verbose)
    return 0


def _iterations(value: str) -> int:
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of iterations (an integer >= 0)")
    return int(value)


def _resume_args(p: argparse.ArgumentParser) -> None:
    """Training states of a single-process training, which a rerun of the same command resumes from."""
    p.add_argument("--checkpoint-every", type=_iterations, default=500, metavar="N",
                   help="save the training state every N iterations (in $DDPS_STORAGE or $DDPS_HOME states/, "
                        "removed once the checkpoint is written); rerunning the same command after an interruption "
                        "resumes from the last one (default: %(default)s; 0: none)")


def _training_commands(sub) -> None:
    """data build, train-base, train."""
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="build a dataset cache and print its statistics")
    build.add_argument("dataset", help="fashion-scenes")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache exists")
    _config_args(build)
    build.set_defaults(func=cmd_data_build)

    train = sub.add_parser("train-base", help="train a base segmentor and save its checkpoint")
    _config_args(train)
    train.add_argument("--out", help="checkpoint path (default: content-addressed under $DDPS_HOME)")
    train.add_argument("--force", action="store_true", help="retrain from iteration 0 even if the checkpoint or "
                                                            "a training state exists")
    _resume_args(train)
    _device_args(train)
    train.set_defaults(func=cmd_train_base)

    tr = sub.add_parser("train", help="train the DDPS refiner (stage 1 then stage 2) on a frozen base segmentor")
    tr.add_argument("experiment", nargs="?", help="experiment YAML (same as --config)")
    _config_args(tr)
    tr.add_argument("--base", help="base segmentor checkpoint (default: the config's, trained first if missing)")
    tr.add_argument("--out", help="checkpoint folder (default: $DDPS_HOME/checkpoints, content-addressed)")
    tr.add_argument("--force", action="store_true", help="retrain stages from iteration 0 even if their "
                                                         "checkpoints or training states exist")
    _resume_args(tr)
    _device_args(tr)
    tr.set_defaults(func=cmd_train)


def _model_commands(sub) -> None:
    """eval, refine, import official."""
    ev = sub.add_parser("eval", help="evaluate a checkpoint and print its row")
    ev.add_argument("checkpoint", help="a ddps checkpoint, or a state-dict file of the model --preset/--set build")
    ev.add_argument("--preset", default="cpu", help="for a bare state-dict file: the config that builds its model")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ev.add_argument("--no-ms", action="store_true", help="skip the multi-scale + flip test (base segmentors)")
    ev.add_argument("--all-steps", action="store_true", help="refiners: metrics after every refinement step")
    ev.add_argument("--json", action="store_true", help="print every score at full precision as one JSON "
                                                        "object (per step, per class, mask reliance)")
    ev.add_argument("--split", choices=EVAL_SPLITS, help="val | holdout (the data.holdout training images "
                    "kept out of every training, for choosing hyper-parameters); default: the config's eval.split, val")
    _device_args(ev)
    ev.set_defaults(func=cmd_eval)

    rf = sub.add_parser("refine", help="refine your own images with a trained refiner")
    rf.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    rf.add_argument("--checkpoint", required=True, help="a refiner checkpoint (ddps train), or runs:/<run id>/"
                                                        "model/<file>.pt logged by ddps pipeline")
    rf.add_argument("--out", required=True, help="folder for <stem>.png masks and <stem>-strip.png strips")
    rf.add_argument("--steps", type=int, help="test steps (default: the checkpoint's infer.steps)")
    rf.add_argument("--seed", type=int, default=0)
    rf.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="change the checkpoint's inference settings, e.g. infer.cfg_scale=0.4, infer.ema=false, "
                         "data.test_resize=0")
    rf.add_argument("--tracking-uri", help="for runs:/ checkpoints (default: $MLFLOW_TRACKING_URI, else the "
                                           "embedded store in $DDPS_HOME)")
    _device_args(rf)
    rf.set_defaults(func=cmd_refine)

    im = sub.add_parser("import", help="import published models as ddps checkpoints").add_subparsers(
        dest="import_command", required=True)
    off = im.add_parser("official", help="an official DDPS checkpoint (Hugging Face Hub aaronb/DDPS-all) -> a ddps "
                                         "base checkpoint + a refiner checkpoint")
    off.add_argument("checkpoint", help="the official .pth file (an mmcv checkpoint)")
    off.add_argument("--base", help="the MMSegmentation SegFormer checkpoint the DDPS model was trained on (its "
                                    "classifier is not in the DDPS file)")
    off.add_argument("--out", required=True, help="folder for <name>-base.pt and <name>-refiner.pt")
    off.add_argument("--dataset", choices=("ade20k", "cityscapes"),
                     help="default: from the number of diffusion states (151: ADE20K, 20: Cityscapes)")
    off.set_defaults(func=cmd_import_official)


def _platform_commands(sub) -> None:
    """pipeline, sweep, report, ui, demo."""
    pl = sub.add_parser("pipeline", help="base -> stage 1 -> stage 2 -> evaluation on Ray Train, tracked in MLflow")
    pl.add_argument("experiment", nargs="?", help="experiment YAML (same as --config)")
    _config_args(pl)
    _cluster_args(pl)
    pl.add_argument("--mlflow-experiment", help="MLflow experiment name (default: ddps-<dataset>)")
    pl.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    pl.set_defaults(func=cmd_pipeline)

    sw = sub.add_parser("sweep", help="run experiment grids with Ray Tune: every training once, every cell evaluated")
    sw.add_argument("experiments", nargs="*", help="experiment YAMLs (experiments/*.yaml)")
    sw.add_argument("--all", action="store_true", help="every experiment file in experiments/")
    sw.add_argument("--preset", default="cpu", help=PRESET_HELP)
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value in every cell (repeatable)")
    sw.add_argument("--cell-set", dest="cell_overrides", action="append", default=[],
                    metavar="AXIS=LABEL:SECTION.KEY=VALUE", help="an override for the cells whose AXIS value is LABEL, "
                    "e.g. a published base per backbone: 'backbone=SegFormer MiT-B2:base.pretrained=b2.pth'")
    sw.add_argument("--data-root", help="dataset root (e.g. the ADE20K folder for --preset paper)")
    sw.add_argument("--dry-run", action="store_true", help="print the plan (cells, trainings against naive, "
                                                           "estimated time) and run nothing")
    sw.add_argument("--gpu-rates", metavar="FILE", help="the rates benchmarks/gpu.py measured on a GPU, for the "
                                                       "dry run's GPU-hours (default: $DDPS_HOME/rates/gpu.json)")
    _cluster_args(sw)
    sw.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", help="Markdown tables, findings and figures from the MLflow runs (no torch)")
    rp.add_argument("--experiment", dest="experiments", action="append", default=[], metavar="NAME",
                    help="an MLflow experiment: a table (table3e, ...) or a pipeline's (repeatable)")
    rp.add_argument("--all", action="store_true", help="every experiment with a FINISHED evaluation run")
    rp.add_argument("--out", default="reports", help="output folder (default: %(default)s)")
    rp.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite "
                                           "in $DDPS_HOME)")
    rp.add_argument("--no-figures", action="store_true", help="Markdown only")
    rp.add_argument("--no-log", action="store_true", help="do not log the figures to the tables' parent runs")
    rp.add_argument("--no-parquet", action="store_true", help="no parquet export of the runs")
    rp.add_argument("--split", choices=EVAL_SPLITS, help="the evaluations on this split (eval.split); "
                    "default: each table's val evaluations, or its holdout ones when it has no val")
    rp.set_defaults(func=cmd_report)

    ui = sub.add_parser("ui", help="serve the MLflow UI over the embedded store, on 127.0.0.1")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", help="the store to serve (default: the embedded sqlite in $DDPS_HOME)")
    ui.set_defaults(func=cmd_ui)

    demo = sub.add_parser("demo", help="the embedded default: build data, run the pipeline, print its table")
    demo.add_argument("--preset", default="demo", help=PRESET_HELP + "; cpu: the full run, ~2.5 h on 2 cores")
    demo.add_argument("--workers", type=int, default=2, help="data-parallel Ray Train workers (default: 2)")
    demo.add_argument("--cpus-per-worker", type=float, default=1.0)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    _device_args(demo, CLUSTER_GPU_HELP)
    demo.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    _system_metrics_arg(demo)
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _training_commands(sub)
    _model_commands(sub)
    _platform_commands(sub)
    return parser


def one_line(error: BaseException) -> str:
    """A DDPSError's message; for one re-raised by a DataLoader worker, its original last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "storage"):  # checked before any compute; the workers get it with DDPS_STORAGE
            use_storage(args.storage or os.environ.get(STORAGE_VAR))
        return args.func(args)
    except DDPSError as e:
        print(f"ddps: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = args.func in (cmd_train_base, cmd_train) and args.checkpoint_every > 0
        hint = ("; rerun the same command to resume from its last training state" if resumable else
                "; rerun the same command to resume: finished trainings and cells are kept" if args.func is cmd_sweep
                else "")
        print("ddps: interrupted" + hint, file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
