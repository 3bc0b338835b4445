"""Command line: `lictrain train|eval|compare|compress|decompress|demo|anchors|plot|analyze|ptq|import|export|list`.

User errors (bad path, unknown config key, corrupt file, ...) end as one line `error: ...` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import rundir
from .errors import LictrainError

log = logging.getLogger("lictrain")


class _TqdmHandler(logging.Handler):
    """Log lines that do not break a progress bar that may be on screen."""

    def emit(self, record):
        from tqdm import tqdm

        msg = self.format(record)
        tqdm.write(msg, file=sys.stderr)


class _Formatter(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        return f"{record.levelname.lower()}: {msg}" if record.levelno >= logging.WARNING else msg


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 reports progress; others warn and fail
        log.setLevel(logging.WARNING)
    log.propagate = False


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file, or the name of a built-in config (demo, mini, bench, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=2e-4 (repeatable)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lictrain")
    except PackageNotFoundError:  # run from a checkout without installing
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lictrain", description="Train, evaluate and code learned image compression models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    parser.add_argument("--version", action="version", version=f"lictrain {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (YAML config + --set overrides)",
                       description="Train a model. The resolved config is written to RUN_DIR/config.yaml.")
    _add_config_args(p)
    p.add_argument("--run-dir", help="where checkpoints and logs go (config key run_dir)")
    p.add_argument("--optimizer", help="shortcut for --set optim.name=NAME")
    p.add_argument("--recipe", help="a named recipe (as in compare: adam, soap, balanced-rd, balanced-rd-qp, ...); "
                                    "--optimizer and --set apply on top of it")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights (shortcut for --set train.init_from=...)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR exactly where its last checkpoint left it "
                        "(its saved config is used; --set may change e.g. train.steps)")

    p = sub.add_parser("eval", help="evaluate checkpoints with real bitstreams",
                       description="Real compress/decompress of every image: bpp from bytes, PSNR and MS-SSIM on "
                                   "8-bit RGB. Writes per_image.csv and results.json (CompressAI's format). A video "
                                   "checkpoint (dcvc) codes every sequence of --data in groups of pictures (its "
                                   "I-frame codec, then low-delay P-frames), decodes them bit-exactly and reports "
                                   "bpp, PSNR-RGB and PSNR-Y/U/V/YUV per sequence (per_sequence.csv, per_frame.csv).")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files or run folders, one per R-D point")
    p.add_argument("--data", default="samples:val", help="image folder, or samples / samples:val (default)")
    p.add_argument("--out", help="output folder (default: <first run folder>/eval-<data set name>)")
    p.add_argument("--pick", choices=["last", "best"], default="last",
                   help="for a run folder: its last checkpoint (checkpoint.pt, the end of the run, as compare "
                        "measures; default) or the best validation's (checkpoint_best.pt)")
    p.add_argument("--name", help="curve name in results.json")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--max-images", type=int, help="evaluate on the first N images (video: sequences) only")
    p.add_argument("--device", default="cpu", help="where the transforms run (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--anchor", action="append", default=[], metavar="CURVE",
                   help="also print the BD-rate against this curve: a published one on the same set (vtm, bpg, jpeg, "
                        "...: lictrain anchors --list) or a results .json (repeatable)")
    p.add_argument("--intra-period", type=int, default=32,
                   help="video checkpoints: an I-frame every N frames, low-delay P-frames between (default 32, the SOAP "
                        "paper's video test condition)")
    p.add_argument("--frames", type=int, help="video checkpoints: code the first N frames of each sequence "
                                              "(default: all)")
    p.add_argument("--yuv-matrix", default="bt709", choices=["bt709", "bt601"],
                   help="video checkpoints on raw .yuv files: their YUV matrix (default bt709)")
    p.add_argument("--yuv-full-range", action="store_true",
                   help="video checkpoints on raw .yuv files: full range (default: limited, 16-235)")

    p = sub.add_parser("compress", help="compress one image into a .lic file",
                       description="Compress one image into a .lic file (lictrain/bitstream.py) with a trained "
                       "model's real entropy coder.")
    p.add_argument("image", help="the image to compress (png, jpg, ...)")
    p.add_argument("-o", "--output", required=True, help="the .lic file to write")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--device", default="cpu", help="where the transforms run (default cpu; decode on the same kind of device)")

    p = sub.add_parser("decompress", help="decompress a .lic file into a PNG",
                       description="Decompress a .lic file with the checkpoint that wrote it (its fingerprint, device "
                       "kind and coder tables are checked) into a lossless image.")
    p.add_argument("file", help="the .lic file")
    p.add_argument("-o", "--output", required=True, help="output image (.png, .bmp, .tif or .webp)")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the file was compressed with")
    p.add_argument("--device", default="cpu", help="where the transforms run (default cpu; the kind the file was encoded on)")

    p = sub.add_parser("compare", help="train recipes side by side: Steps-to-anchor, Time-to-anchor, BD-rate",
                       description="Trains every recipe at every lambda and seed from the same initial weights and "
                                   "data order, evaluates with real bitstreams and writes summary.md, summary.json "
                                   "and plots into --out. Finished runs are reused, interrupted ones resumed.")
    _add_config_args(p)
    p.add_argument("--recipes", help="comma-separated, the first is the anchor (e.g. adam,soap)")
    p.add_argument("--lambdas", help="comma-separated lambdas (e.g. 0.0035,0.0067,0.013,0.025)")
    p.add_argument("--lambdas-for", action="append", default=[], metavar="RECIPE=L1,L2,...",
                   help="a recipe's own lambdas (repeatable), for recipes that move the rate-distortion balance: "
                        "chosen so that its bpp range overlaps the anchor's (config compare.lambdas_for)")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--eval-data", nargs="+", help="evaluation folders (or samples specs)")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--anchor", action="append", default=[], metavar="CURVE",
                   help="a published curve (vtm, bpg, ... where published on the evaluation set) or a results .json "
                        "to draw and to take BD-rates against (repeatable; config compare.references)")
    p.add_argument("--codecs", help="classical codecs measured on each evaluation set, comma-separated (default "
                                    "jpeg; 'none' for none; config compare.codecs)")

    p = sub.add_parser("demo", help="the main job: Adam against SOAP on the bundled photos (a small compare)",
                       description="A small compare (configs/demo.yaml): Adam and SOAP trained from the same "
                                   "initial weights on scikit-image's bundled photos, evaluated with real bitstreams; "
                                   "prints the Steps/Time-to-Adam and BD-rate summary and writes it with the R-D, "
                                   "loss-curve and per-run plots under runs/demo/ (about 10 minutes on two CPU "
                                   "cores). Finished runs are reused; an interrupted one resumes.")
    _add_config_args(p)
    p.add_argument("--run-dir", default="runs/demo", help="output folder (default runs/demo)")

    p = sub.add_parser("anchors", help="measure classical codecs (JPEG, WebP, AVIF, JPEG 2000, BPG) on an image set",
                       description="Code every image at a sweep of each codec's quality (or, with --match, at the "
                                   "quality closest to each point of a results file), with real file sizes and "
                                   "lictrain's metrics; writes OUT/<codec>.json (CompressAI's results format) and "
                                   "OUT/<codec>_per_image.csv. Codecs that need a missing binary are named, not run.")
    p.add_argument("--data", default="samples:val", help="image folder or samples spec (default samples:val)")
    p.add_argument("--codecs", default="jpeg,webp,avif,jpeg2000",
                   help="comma-separated (default jpeg,webp,avif,jpeg2000; also bpg)")
    p.add_argument("--qualities", help="the sweep, comma-separated (default: each codec's own; JPEG 2000 takes "
                                       "target bpp, BPG its QP)")
    p.add_argument("--match", metavar="RESULTS_JSON",
                   help="instead of a sweep: per image, the quality closest to each point of this results file")
    p.add_argument("--by", choices=["bpp", "psnr"], default="bpp", help="what --match matches (default bpp)")
    p.add_argument("--max-images", type=int, help="the first N images only")
    p.add_argument("--out", default="runs/anchors", help="output folder (default runs/anchors)")
    p.add_argument("--list", action="store_true", help="list the codecs available here and the published curves")

    p = sub.add_parser("plot", help="R-D curves of results files beside published or measured anchors",
                       description="Any results files (lictrain eval, lictrain anchors, CompressAI's) on one R-D "
                                   "plot, with published curves (--with vtm,bpg) grey and dashed; with --anchor, a "
                                   "BD-rate table against it.")
    p.add_argument("results", nargs="+", help="results .json files (CompressAI's format)")
    p.add_argument("--with", dest="refs", metavar="CURVES",
                   help="comma-separated published curves (vtm, bpg, jpeg, ...) or more .json files, drawn as anchors")
    p.add_argument("--set", dest="dataset", default="kodak",
                   help="the set the published curves are taken from (default kodak; lictrain anchors --list)")
    p.add_argument("--anchor", help="print BD-rates against this curve (a published name or a .json)")
    p.add_argument("--metric", choices=["psnr", "ms-ssim"], default="psnr", help="quality axis (default psnr)")
    p.add_argument("-o", "--out", default="rd.png", help="the figure to write (default rd.png)")

    p = sub.add_parser("analyze", help="gradient conflicts and outliers (the SOAP-for-LIC paper's analyses)",
                       description="conflicts: fine-tune from a checkpoint with each optimizer at a small lr and "
                                   "track intra-/inter-step update cosines (Figure 3). outliers: Kurt / MaxMed of "
                                   "latents and activations and deviation maps (Table 2, Figure 4). plot: probe "
                                   "metrics logged during training, several runs on one figure (Figure 14).")
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    a = asub.add_parser("conflicts", help="intra-/inter-step cosines from a checkpoint",
                        description="Fine-tune from a checkpoint with each optimizer at a small learning rate and log "
                                    "the intra-step cosine S(p_R, p_D) and the inter-step cosine S(p_t-1, p_t) of "
                                    "its updates (the SOAP-for-LIC paper's Figure 3); writes conflicts.md/.json/.png.")
    a.add_argument("checkpoint", help="checkpoint file or run folder to start from")
    a.add_argument("--optimizers", default="adam,soap", help="comma-separated (default adam,soap)")
    a.add_argument("--steps", type=int, default=200, help="fine-tuning steps per optimizer (default 200)")
    a.add_argument("--lr", type=float, default=1e-5, help="the paper uses 1e-5 (default)")
    a.add_argument("--every", type=int, default=1, help="probe every N steps (default 1)")
    a.add_argument("--per-layer", action="store_true", help="also log per-tensor cosines")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config (e.g. data.train=...)")
    a.add_argument("--out", default="runs/analysis/conflicts", help="output folder (default runs/analysis/conflicts)")
    a = asub.add_parser("outliers", help="Kurt / MaxMed table and deviation maps for checkpoints",
                        description="Kurtosis and max/median of latents and of one layer's activations, per "
                                    "checkpoint, and deviation maps (the paper's Table 2 and Figure 4); writes "
                                    "outliers.md/.json and deviation_N.png.")
    a.add_argument("checkpoints", nargs="+", help="checkpoint files or run folders")
    a.add_argument("--data", default="samples:val", help="image folder or samples spec (default samples:val)")
    a.add_argument("--layer", default="g_a.3", help="module whose activations to measure (default g_a.3; "
                                                      "'none' for latents only)")
    a.add_argument("--max-images", type=int, help="use the first N images only (default all)")
    a.add_argument("--maps", type=int, default=3, help="deviation-map figures for the first N images (default 3)")
    a.add_argument("--names", help="comma-separated names for the checkpoints (default: run folder names)")
    a.add_argument("--out", default="runs/analysis/outliers", help="output folder (default runs/analysis/outliers)")
    a = asub.add_parser("plot", help="probe metrics of several runs over training on one figure",
                        description="Probe metrics that runs logged during training (probe.* options) over "
                                    "training steps, several runs on one figure (the paper's Figure 14).")
    a.add_argument("runs", nargs="+", help="run folders trained with probe.* options")
    a.add_argument("--metrics", default="latent_kurt,latent_maxmed",
                   help="comma-separated (default latent_kurt,latent_maxmed; or intra_cos,inter_cos)")
    a.add_argument("--out", default="runs/analysis/probes.png",
                   help="the figure to write (default runs/analysis/probes.png)")

    p = sub.add_parser("ptq", help="W8A8 post-training quantization of checkpoints, with ΔBD-rate against float",
                       description="Quantize each checkpoint (int8 per-channel weights by AdaRound and/or nearest "
                       "rounding; 8-bit dynamic per-channel activations), evaluate float and W8A8 with real "
                       "bitstreams, and write ΔBD-rate per training recipe to OUT/summary.md and summary.json.")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files or run folders, one per lambda")
    p.add_argument("--calib", required=True, help="calibration images (folder or samples spec)")
    p.add_argument("--data", default="samples:val", help="evaluation images (default samples:val)")
    p.add_argument("--out", default="runs/ptq", help="output folder (default runs/ptq)")
    p.add_argument("--weights", default="adaround,nearest", help="adaround, nearest or both (default both)")
    p.add_argument("--iters", type=int, default=1000,
                   help="AdaRound iterations per layer (default 1000; RDO-PTQ uses 20000 on a GPU)")
    p.add_argument("--batch", type=int, default=4, help="calibration crops per AdaRound iteration (default 4)")
    p.add_argument("--calib-images", type=int, default=8, help="calibration images (default 8)")
    p.add_argument("--calib-crop", type=int, default=256, help="centre crop of each calibration image (default 256)")
    p.add_argument("--keep-float", default="", help="comma-separated module prefixes left in float (e.g. h_s; default none)")
    p.add_argument("--max-images", type=int, help="evaluate on the first N images (video: sequences) only")
    p.add_argument("--min-targets-per-weight", type=float, default=10.0,
                   help="AdaRound only layers with at least this many calibration outputs per weight, nearest "
                   "rounding elsewhere (default 10; 0: AdaRound everywhere)")
    p.add_argument("--outliers", action="store_true",
                   help="add the float models' latent and activation Kurt / MaxMed (the rest of the paper's Table 2)")

    p = sub.add_parser("import", help="make a lictrain checkpoint of weights trained elsewhere (a state dict; "
                       "the public code's names for models with a key map)",
                       description="Make a lictrain checkpoint (for eval, compress, analyze, ptq or --init-from) of "
                       "a model's weights trained elsewhere: a plain state dict in lictrain's names, or in the public "
                       "code's for the models with a key map (lictrain/models/public_weights.py).")
    p.add_argument("weights", help="a torch.save'd state dict (or a dict holding one under 'state_dict' / 'model')")
    p.add_argument("--model", required=True, help="a registered model (lictrain list)")
    p.add_argument("--preset", default="paper",
                   help="the preset whose widths the weights have (default paper; lictrain list shows them)")
    p.add_argument("--lmbda", type=float, required=True, help="the lambda the weights were trained for")
    p.add_argument("--metric", default="mse", choices=["mse", "ms-ssim"],
                   help="the distortion the weights were trained for (default mse)")
    p.add_argument("--kwargs", metavar="K=V,...",
                   help="constructor arguments over the preset's (e.g. N=128,M=192 for CompressAI's lower qualities)")
    p.add_argument("--out", required=True, help="the checkpoint file to write")

    p = sub.add_parser("export", help="write a checkpoint's weights as a plain state dict with its coder's tables",
                       description="A plain state dict (EMA weights by default) with the entropy coder's tables "
                                   "built (CompressAI's update()), loadable by the model's own class outside "
                                   "lictrain, e.g. compressai.models.MeanScaleHyperprior(N=192, M=320).")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("-o", "--output", required=True, help="the .pth file to write")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA weights")

    p = sub.add_parser("video-prepare", help="cut training sequences from video clips (Vimeo-90k layout)",
                       description="Decode clips (containers through PyAV, raw 4:2:0 .yuv files directly; BT.709 "
                                   "limited range unless told otherwise), resize and centre-crop every frame, and "
                                   "write windows of consecutive frames as sequences/CCCCC/SSSS/imN.png with "
                                   "sep_trainlist.txt / sep_testlist.txt (test clips are held out whole).")
    p.add_argument("clips", nargs="+", help="video files (.mp4, .mkv, .264, ... through PyAV; .yuv raw 4:2:0)")
    p.add_argument("-o", "--out", required=True, help="the output root")
    p.add_argument("--frames", type=int, default=7, help="frames per sequence (default 7, a Vimeo septuplet)")
    p.add_argument("--every", type=int, default=30, help="a sequence starts every N frames (default 30)")
    p.add_argument("--size", default="448x256", help="WIDTHxHEIGHT: resize to HEIGHT (aspect kept), centre-crop to "
                                                      "WIDTH (default 448x256, Vimeo-90k's); 'none' keeps frames")
    p.add_argument("--test", default="", help="comma-separated clip file names held out for testing (default: none; all clips train)")
    p.add_argument("--max-per-clip", type=int, help="at most N sequences per clip")
    p.add_argument("--matrix", default="bt709", choices=["bt709", "bt601"],
                   help="the YUV->RGB matrix of raw .yuv clips (default bt709)")
    p.add_argument("--full-range", action="store_true", help="the clips are full range (JPEG), not limited (MPEG)")

    p = sub.add_parser("video-compare", help="recipes through a chain of training stages (DCVC's four)",
                       description="Every recipe runs every stage config in order, each stage from the same recipe's "
                                   "previous one (train.init_from); per stage Steps/Time-to-anchor (the first recipe) "
                                   "and one figure of validation loss against steps and time (the SOAP paper's Fig. 7).")
    p.add_argument("--stages", default="dcvc-stage1,dcvc-stage2,dcvc-stage3,dcvc-stage4",
                   help="comma-separated stage configs, built-in names or YAML files (default: DCVC's four, "
                        "dcvc-stage1..4)")
    p.add_argument("--recipes", default="adam,soap", help="comma-separated recipes; the first is the anchor (default adam,soap)")
    p.add_argument("--out", required=True, help="the output folder (runs RECIPE-stageK, stages.md, the figure)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override applied to every stage of every recipe (repeatable)")

    p = sub.add_parser("list", help="list models, presets, optimizers and methods",
                       description="The registered models and their presets, optimizers, methods, recipes, built-in "
                                   "configs and config keys.")
    p.add_argument("--params", action="store_true",
                   help="also count each preset's parameters and kMACs per pixel (builds and runs every model once "
                        "at 256x256)")
    return parser


def cmd_analyze(args) -> int:
    from .analysis import commands

    if args.analysis == "conflicts":
        opts = [o for o in args.optimizers.split(",") if o]
        summary = commands.conflicts(args.checkpoint, opts, Path(args.out), args.steps, args.lr, args.every,
                                     args.per_layer, args.overrides)
        print((Path(args.out) / "conflicts.md").read_text())
        print(f"wrote {Path(args.out) / 'conflicts.png'} and conflicts.json ({len(summary)} optimizers)")
    elif args.analysis == "outliers":
        layer = None if args.layer.lower() == "none" else args.layer
        names = args.names.split(",") if args.names else None
        commands.outliers(args.checkpoints, args.data, Path(args.out), layer, args.max_images, args.maps, names)
        print((Path(args.out) / "outliers.md").read_text())
        print(f"wrote {Path(args.out)}/outliers.json and deviation_*.png")
    else:
        written = commands.plot_runs(args.runs, [m for m in args.metrics.split(",") if m], Path(args.out))
        print(f"wrote {written}")
    return 0


def cmd_train(args) -> int:
    from .checkpoint import checkpoint_config, load_checkpoint
    from .config import check_resume, load_config, set_key, validate, parse_override
    from .trainer import train

    if args.resume:
        if args.config or args.optimizer or args.run_dir or args.recipe or args.init_from:
            raise LictrainError("--resume continues the run with its saved config: --config, --optimizer, --recipe, "
                                "--init-from and --run-dir do not go with it (change e.g. train.steps with --set)")
        if not rundir.has_checkpoint(args.resume):
            from .trainer import nothing_to_resume

            raise LictrainError(nothing_to_resume(Path(args.resume)))
        ckpt = load_checkpoint(rundir.checkpoint_file(args.resume))
        cfg = checkpoint_config(ckpt)
        cfg.run_dir = str(args.resume)
        for o in args.overrides:
            set_key(cfg, *parse_override(o))
        check_resume(checkpoint_config(ckpt), cfg)  # the keys' own policy (config.setting); the trainer checks again
        validate(cfg)
    else:
        from .recipes import recipe_overrides

        overrides = recipe_overrides(args.recipe) if args.recipe else []
        overrides += list(args.overrides)
        if args.init_from:
            overrides.append(f"train.init_from={args.init_from}")
        if args.run_dir:
            overrides.append(f"run_dir={args.run_dir}")
        if args.optimizer:
            overrides.append(f"optim.name={args.optimizer}")
        cfg = load_config(args.config, overrides)
    result = train(cfg, resume=bool(args.resume))
    curves = Path(result.run_dir) / rundir.CURVES
    try:  # the run's curves (loss against steps and time, bpp, PSNR), interrupted or not; a plot never fails a run
        from .comparison.plots import plot_run

        plot_run(rundir.metrics_file(result.run_dir), curves,
                 title=f"{cfg.model.name}/{cfg.model.preset}, {cfg.optim.name}, λ={cfg.loss.lmbda:g}")
    except (OSError, ValueError, KeyError) as e:
        log.warning("no loss-curve plot: %s", e)
        curves = None
    if result.interrupted:  # a script's `lictrain train ... && lictrain eval ...` must not go on
        log.warning("interrupted at step %d of %d (checkpoint %s); continue with: lictrain train --resume %s",
                    result.step, cfg.train.steps, rundir.checkpoint_file(result.run_dir), result.run_dir)
        return 128 + result.interrupted
    log.info("done: %d steps, %.1f s training time, checkpoint %s%s", result.step, result.train_time,
             rundir.checkpoint_file(result.run_dir), f", curves {curves}" if curves else "")
    return 0


def cmd_eval(args) -> int:
    from .data import set_name
    from .evaluation import evaluate, timing_line

    files = [str(rundir.checkpoint_file(c, best=args.pick == "best")) for c in args.checkpoints]  # rows name the file
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise LictrainError(f"checkpoint not found: {missing[0]}" + (
            " (a run writes checkpoint_best.pt at its first regular validation)" if args.pick == "best" else ""))
    first = Path(args.checkpoints[0])
    from .video.evaluate import evaluate_video, format_video_table, is_video_checkpoint

    if is_video_checkpoint(files[0]):
        if args.device != "cpu":
            raise LictrainError("video coding runs on the CPU for now (--device cpu)")
        if args.data == "samples:val":
            raise LictrainError("a video checkpoint needs --data: a .yuv file, a folder of them, or frame folders "
                                "(e.g. ../shared/data/video/septuplets[test])")
        out = args.out or str((first.parent if first.is_file() else first) / "eval-video")
        summary = evaluate_video(files, args.data, out, args.intra_period, args.frames, args.max_images,
                                 not args.raw, args.yuv_matrix, args.yuv_full_range)
        print(format_video_table(summary))
        print(f"wrote {Path(out) / 'results.json'}, {Path(out) / 'per_sequence.csv'} and "
              f"{Path(out) / 'per_frame.csv'}")
        return 0
    out = args.out or str((first.parent if first.is_file() else first) / f"eval-{set_name(args.data)}")
    summary = evaluate(files, args.data, out, use_ema=not args.raw, name=args.name,
                       max_images=args.max_images, device=args.device)
    print(format_results_table(summary))
    if timing_line(summary):
        print(timing_line(summary))
    if args.anchor:
        from .anchors.curves import curve_from_results, resolve

        from .comparison.plots import plot_curves

        curve = curve_from_results(summary, summary["name"], "this evaluation")
        anchors = [resolve(a, set_name(args.data)) for a in args.anchor]
        for line in bd_rate_lines([curve], anchors):
            print(line)
        print(f"wrote {plot_curves([curve, *anchors], Path(out) / 'rd.png', focus=[curve])}")
    print(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'per_image.csv'}")
    return 0


def bd_rate_lines(curves, anchors, metric: str = "psnr") -> list[str]:
    """'BD-rate of X vs Y: ...' for every curve against every anchor (bjontegaard, Akima; over the overlap)."""
    from .comparison.figures import BDRateUnavailable, bd_rate

    lines = []
    for anchor in anchors:
        for c in curves:
            try:
                value = f"{bd_rate(anchor.points(metric), c.points(metric)):+.2f}%"
            except BDRateUnavailable as e:
                value = f"unavailable ({e})"
            lines.append(f"BD-rate ({'PSNR' if metric == 'psnr' else 'MS-SSIM'}) of {c.label} vs {anchor.label}: "
                         f"{value}")
    return lines


def format_results_table(summary: dict) -> str:
    from .io import number

    r = summary["results"]
    lines = ["| checkpoint | lambda | bpp | bpp (est.) | PSNR-RGB (dB) | MS-SSIM | enc (s) | dec (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    labels = r.get("checkpoint") or [""] * len(r["bpp"])  # results written before the column existed have none
    for i in range(len(r["bpp"])):
        lines.append(f"| {labels[i]} | {r['lmbda'][i]:g} | {r['bpp'][i]:.4f} | {r['bpp_estimated'][i]:.4f} | "
                     f"{r['psnr-rgb'][i]:.2f} | {number(r['ms-ssim-rgb'][i], '.4f')} | {r['encoding_time'][i]:.3f} | "
                     f"{r['decoding_time'][i]:.3f} |")
    return "\n".join(lines)


def cmd_compress(args) -> int:
    from .evaluation import compress_file

    info = compress_file(args.checkpoint, args.image, args.output, device=args.device)
    print(f"{args.output}: {info['bytes']} bytes, {info['bpp']:.4f} bpp (file size, header included)")
    return 0


def cmd_decompress(args) -> int:
    from .evaluation import decompress_file

    info = decompress_file(args.checkpoint, args.file, args.output, device=args.device)
    print(f"{args.output}: {info['width']}x{info['height']}")
    return 0


def _csv(text: str, kind):
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LictrainError(f"cannot read '{text}' as a comma-separated list of {kind.__name__}") from None


def parse_lambdas_for(items: list[str]) -> dict[str, list[float]]:
    """--lambdas-for RECIPE=L1,L2,... (repeatable) as {recipe: [lambdas]} (also benchmarks/parallel_compare.py's)."""
    grids = {}
    for item in items:
        recipe, sep, values = item.partition("=")
        if not sep or not recipe.strip() or not values.strip():
            raise LictrainError(f"--lambdas-for takes RECIPE=L1,L2,..., got '{item}'")
        grids[recipe.strip()] = _csv(values, float)
    return grids


def cmd_compare(args) -> int:
    from .comparison.compare import compare, summary_markdown
    from .config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    if args.recipes:
        cfg.compare.recipes = _csv(args.recipes, str)
    if args.lambdas:
        cfg.compare.lambdas = _csv(args.lambdas, float)
    if args.seeds:
        cfg.compare.seeds = _csv(args.seeds, int)
    cfg.compare.lambdas_for = {**cfg.compare.lambdas_for, **parse_lambdas_for(args.lambdas_for)}
    if args.eval_data:
        cfg.compare.eval_data = list(args.eval_data)
    if args.codecs:
        cfg.compare.codecs = [] if args.codecs == "none" else _csv(args.codecs, str)
    cfg.compare.references = list(cfg.compare.references) + [a for arg in args.anchor for a in _csv(arg, str)]
    validate(cfg)
    summary = compare(cfg, args.out)
    print(summary_markdown(summary))
    print("plots: " + ", ".join(summary["plots"]))
    return 0


def cmd_demo(args) -> int:
    from .comparison.demo import run_demo

    run_demo(args.config or "demo", args.overrides, args.run_dir)
    return 0


def cmd_ptq(args) -> int:
    from .quantization.report import format_summary, ptq_report

    modes = tuple(m for m in args.weights.split(",") if m)
    bad = [m for m in modes if m not in ("adaround", "nearest")]
    if bad or not modes:
        raise LictrainError(f"--weights takes adaround, nearest or both, got '{args.weights}'")
    summary = ptq_report(args.checkpoints, args.calib, args.data, args.out, modes, args.iters, args.batch,
                         args.calib_images, args.calib_crop, tuple(k for k in args.keep_float.split(",") if k),
                         args.max_images, outliers=args.outliers,
                         min_targets_per_weight=args.min_targets_per_weight)
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'summary.md'} and {Path(args.out) / 'summary.json'}")
    return 0


def cmd_anchors(args) -> int:
    from .anchors.codecs import CODECS, split_available, unavailable_line
    from .anchors.curves import load_results, published_names, published_sets
    from .anchors.measure import measure, write_results

    if args.list:
        for c in CODECS.values():
            print(f"  {c.name}: {c.describe() if c.available() else 'unavailable (needs ' + (c.needs or 'a Pillow built with it') + ')'}")
        for dataset in published_sets():
            print(f"published on {dataset}: {', '.join(published_names(dataset))}")
        return 0
    available, missing = split_available(_csv(args.codecs, str))
    if missing:
        log.warning("%s", unavailable_line(missing))
    if not available:
        raise LictrainError("none of the codecs asked for is available here")
    targets = None
    if args.match:
        curve = load_results(args.match)
        targets = list(curve.bpp if args.by == "bpp" else curve.psnr)
    qualities = _csv(args.qualities, float) if args.qualities else None
    for codec in available:
        results, rows = measure(codec, args.data, qualities, args.max_images, targets, args.by)
        path = write_results(results, rows, Path(args.out), codec.name + ("-matched" if targets else ""))
        print(format_anchor_table(results))
        print(f"wrote {path}")
    return 0


def format_anchor_table(results: dict) -> str:
    from .io import number

    r = results["results"]
    lines = [f"{results['description']}", "", "| codec | quality | bpp | PSNR-RGB (dB) | MS-SSIM | enc (s) | dec (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for i in range(len(r["bpp"])):
        lines.append(f"| {results['name']} | {r['quality'][i]:g} | {r['bpp'][i]:.4f} | {r['psnr-rgb'][i]:.2f} | "
                     f"{number(r['ms-ssim-rgb'][i], '.4f')} | {r['encoding_time'][i]:.3f} | "
                     f"{r['decoding_time'][i]:.3f} |")
    return "\n".join(lines)


def cmd_plot(args) -> int:
    from .anchors.curves import load_results, resolve
    from .comparison.plots import plot_curves

    curves = [load_results(r) for r in args.results]
    refs = [resolve(r, args.dataset) for r in _csv(args.refs or "", str)]
    out = plot_curves(curves + refs, args.out, args.metric, focus=curves)
    if args.anchor:
        for line in bd_rate_lines(curves, [resolve(args.anchor, args.dataset)], args.metric):
            print(line)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from .checkpoint import export_weights

    info = export_weights(args.checkpoint, args.output, use_ema=not args.raw)
    args_text = ", ".join(f"{k}={v!r}" for k, v in info["arguments"].items())
    print(f"wrote {args.output}: {info['tensors']} tensors, {info['weights']} weights, coder tables built "
          f"(lambda {info['lmbda']:g}); load with {info['class']}({args_text}).load_state_dict(torch.load(...))")
    return 0


def _kwargs(text: str) -> dict:
    """'N=128,M=192' -> {'N': 128, 'M': 192} (values read as YAML: numbers, lists, booleans)."""
    import yaml

    out = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise LictrainError(f"--kwargs takes KEY=VALUE pairs separated by commas, got '{part}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise LictrainError(f"--kwargs: cannot read the value of {key.strip()}: '{value}'") from None
    return out


def cmd_import(args) -> int:
    from .checkpoint import import_weights

    out = import_weights(args.weights, args.model, args.preset, args.out, args.lmbda, args.metric,
                         _kwargs(args.kwargs or ""))
    print(f"wrote {out}: evaluate it with `lictrain eval {out}`, fine-tune with --set train.init_from={out}")
    return 0


def cmd_video_prepare(args) -> int:
    from .video.prepare import prepare

    size = None
    if args.size.lower() != "none":
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise LictrainError(f"--size must be WIDTHxHEIGHT or none, got '{args.size}'") from None
        size = (w, h)
    test = tuple(t.strip() for t in args.test.split(",") if t.strip())
    counts = prepare(args.clips, args.out, args.frames, args.every, size, test, args.max_per_clip, args.matrix,
                     args.full_range)
    print(f"wrote {counts['train']} training and {counts['test']} test sequences of {args.frames} frames to {args.out}"
          f" (train with data.train={args.out}[train] data.frames=2)")
    return 0


def cmd_video_compare(args) -> int:
    from .video.stages import summary_markdown, video_compare

    summary = video_compare([s.strip() for s in args.stages.split(",") if s.strip()],
                            [r.strip() for r in args.recipes.split(",") if r.strip()], args.out, tuple(args.overrides))
    print(summary_markdown(summary))
    print(f"figure: {summary['figure']}")
    return 0


def cmd_list(args) -> int:
    from .methods import METHODS
    from .models import ALIASES, MODELS, build_model, parameter_count
    from .models.complexity import SIZE, kmacs_per_pixel
    from .optim import OPTIMIZERS, WRAPPERS

    what = f"parameters, kMACs/pixel of a forward pass at {SIZE}x{SIZE}, " if args.params else ""
    print(f"models (presets: {what}arguments):")
    for name, spec in MODELS.items():
        alias = [a for a, t in ALIASES.items() if t == name]
        print(f"  {name}{' (alias ' + ', '.join(alias) + ')' if alias else ''}: {spec.description}")
        for preset, kwargs in spec.presets.items():
            kmacs = kmacs_per_pixel(build_model(name, preset), frames=spec.frames) if args.params else 0.0
            count = (f"{parameter_count(name, preset) / 1e6:7.2f}M {kmacs:8.1f}  "
                     if args.params else "")
            print(f"    {preset:<6} {count}{kwargs}")
    print("optimizers:")
    for name, spec in OPTIMIZERS.items():
        print(f"  {name}: {spec.description}; defaults {spec.defaults}")
    if WRAPPERS:
        print("optimizer wrappers (name+wrapper): " + ", ".join(WRAPPERS))
    print("methods: " + ", ".join(METHODS))
    from .config import CONFIG_DIR, valid_keys
    from .recipes import RECIPES  # (importing recipes registers them)

    print("recipes (compare, train --recipe): " + ", ".join(RECIPES))
    print("built-in configs (--config NAME): " + ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))))
    print("config keys (--set KEY=VALUE): " + ", ".join(valid_keys()))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "compress": cmd_compress,
            "decompress": cmd_decompress, "demo": cmd_demo, "list": cmd_list, "analyze": cmd_analyze,
            "ptq": cmd_ptq, "import": cmd_import, "export": cmd_export, "anchors": cmd_anchors, "plot": cmd_plot,
            "video-prepare": cmd_video_prepare, "video-compare": cmd_video_compare}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except LictrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is not what it should be, a full disk, ...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
