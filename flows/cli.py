"""The `augment` command: a thin shell over the Prefect flow (flows/) and the library's report builder. It lives
beside the flows it starts, so the library (augment/) imports nothing of them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from augment import progress
from augment.backends import check_base
from augment.configfile import load_config
from augment.errors import USER_ERRORS, StorageError, user_error_names
from augment.runfolder import RunFolder, claim, lock, using

if TYPE_CHECKING:  # the CLI starts without pydantic's models of the report loaded (`augment --help` stays fast)
    from augment.report.schema import Metrics


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("augment")
    except PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="augment", description="Synthetic data augmentation with LoRA-tuned diffusion.")
    p.add_argument("--version", action="version", version=f"augment {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="print only warnings, errors and the result (no progress bars, no Prefect log lines)")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    waits = argparse.ArgumentParser(add_help=False)
    waits.add_argument("--wait", action="store_true",
                       help="if another augment process is using the run folder, wait for it instead of failing")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, lock: bool = False, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common, waits] if lock else [common], **kw)

    run = add(
        "run", lock=True,
        help="run the whole job (fine-tune, generate, filter, publish, evaluate, report) as a Prefect flow",
        description="Run the augment flow on a YAML config. Without PREFECT_API_URL set, Prefect starts a temporary "
        "local server; with it set, the run is recorded on that server. Stages whose inputs did not change since "
        "the last run in the same output_dir are reused.",
    )
    run.add_argument("config", help="YAML config, e.g. configs/digits.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set generation.guidance_scale=3 (repeatable)")
    run.add_argument("--output-dir", help="shortcut for --set publish.output_dir=DIR")
    run.add_argument("--force", action="store_true",
                     help="run the flow even when the run folder already holds a finished run of the same config and "
                     "data (its stages are still reused)")

    rep = add("report", lock=True, help="rebuild report.html / report.md / metrics.json of a finished run")
    rep.add_argument("run_dir", help="the run folder (publish.output_dir of the run)")

    val = add("validate", help="check a config and print it with every default filled in")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    srv = add("serve", help="serve the flow as a Prefect deployment (cron schedule and/or run_deployment)")
    srv.add_argument("config", help="YAML config used as the deployment's default parameters")
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value of the deployment's config (repeatable)")
    srv.add_argument("--name", default=None, help="deployment name (default: the config's name)")
    srv.add_argument("--cron", default=None, help="cron schedule, e.g. '0 2 * * *' (none: trigger only)")
    srv.add_argument("--trigger-event", default=None,
                     help="also run when this Prefect event is emitted, e.g. 'dataset.labeled.updated'; the "
                     "event's payload may carry `overrides: [KEY=VALUE, ...]` for that run")
    srv.add_argument("--limit", type=int, default=1,
                     help="runs of this deployment that may execute at once; more wait in the queue (default 1)")
    gen = add("generate", lock=True, help="draw more samples of a class from a finished run's generator")
    gen.add_argument("run_dir", help="the run folder (publish.output_dir of a finished run)")
    gen.add_argument("--class", dest="class_name", required=True, help="class name, as in the dataset's labels")
    gen.add_argument("-n", type=int, required=True, help="how many samples")
    gen.add_argument("--seed", type=int, default=0, help="generation seed (the run's generation.seed reproduces "
                     "its candidates)")
    gen.add_argument("--out", required=True, help="folder for <class>/<sample_id>.png and provenance.parquet")

    push = add("push", lock=True, help="upload a run's dataset (card + parquet shards only) to the Hugging Face Hub")
    push.add_argument("run_dir")
    push.add_argument("repo_id", help="a Hub dataset repo, e.g. my-org/augmented-cats (created if needed)")
    push.add_argument("--to-folder", default=None, help="copy exactly what would be uploaded into this folder instead")
    push.add_argument("--private", action="store_true", help="create the repo as private")

    exp = add("export", lock=True, help="write a finished run's generator as a standalone diffusers checkpoint")
    exp.add_argument("run_dir")
    exp.add_argument("out", help="a new or empty folder")

    dep = add("deploy", help="register the flow as a deployment of a Prefect work pool (workers run it)")
    dep.add_argument("config", help="YAML config used as the deployment's default parameters")
    dep.add_argument("--pool", required=True, help="work pool name, e.g. one made with "
                     "`prefect work-pool create augment-local --type process`")
    dep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    dep.add_argument("--name", default=None, help="deployment name (default: the config's name)")
    dep.add_argument("--cron", default=None, help="cron schedule, e.g. '0 2 * * *'")
    dep.add_argument("--trigger-event", default=None, help="also run when this Prefect event is emitted")
    dep.add_argument("--limit", type=int, default=1, help="runs that may execute at once (default 1)")
    dep.add_argument("--source", default=None,
                     help="where workers get the code: a git URL, or a folder (default: this checkout)")
    dep.add_argument("--image", default=None, help="container image for Docker/Kubernetes work pools")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # This machine may have no internet: no telemetry calls from the temporary Prefect server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.quiet:  # read when Prefect is first imported, below
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    # bars in a terminal; in a log file (a scheduler, `> run.log 2>&1`), progress lines at least every 25 s
    os.environ[progress.ENV] = "0" if args.quiet else "1" if sys.stderr.isatty() else "log"
    try:
        return _command(args)
    except USER_ERRORS as err:  # flows.server.ServerError included
        if args.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in StorageError.DISK_ERRNOS:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: {StorageError.wrap(err)}", file=sys.stderr)  # a full or read-only disk outside a stage
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run folder keeps every finished stage, checkpoint and shard; run the same command "
              "again to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if not _api_gone(err):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: the Prefect API at {os.environ.get('PREFECT_API_URL') or 'PREFECT_API_URL'} stopped answering "
              f"during the run ({type(_api_gone(err)).__name__}); the run folder keeps every finished stage: start "
              "the server again and run the same command to resume", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    from augment.pipeline import finished, preflight

    say = (lambda *a: None) if args.quiet else print  # the result lines of run/report are printed even when quiet
    if args.command == "validate":
        import yaml

        cfg = load_config(args.config, args.overrides)
        preflight(cfg)  # the data loads, the base and output folder are usable: errors here, not an hour later
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if args.command == "report":
        from augment.report.render import build_report

        with using(args.run_dir, wait=args.wait):
            m = build_report(args.run_dir)
        print(_verdict_line(m))
        print(f"report: {RunFolder(args.run_dir).report_html}")
        return 0
    if args.command == "run":
        overrides = args.overrides + ([f"publish.output_dir={args.output_dir}"] if args.output_dir else [])
        cfg = load_config(args.config, overrides)
        t0 = time.time()
        preflight(cfg)  # refuse before Prefect starts or logs: one line, nothing written
        out = Path(cfg.publish.output_dir)
        done = None if args.force else finished(cfg)
        if done is not None:
            print(f"nothing changed since the last run in {out}: every stage, the dataset and the report are current "
                  "(--force runs the flow anyway)", file=sys.stderr)
            print(_verdict_line(done))
            print(f"dataset: {RunFolder(out).dataset.path}  (datasets.load_from_disk or datasets.load_dataset)")
            print(f"report:  {RunFolder(out).report_html}")
            print(f"wall time: {time.time() - t0:.1f} s")
            return 0
        from augment.cpus import job

        # counted among the machine's running jobs from now, before any stage sizes its threads (augment/cpus.py):
        # two jobs started together both see two
        with job():
            metrics = _run_flow(cfg, args.wait)
        say()
        print(_verdict_line(metrics))
        print(f"dataset: {RunFolder(out).dataset.path}  (datasets.load_from_disk or datasets.load_dataset)")
        print(f"report:  {RunFolder(out).report_html}")
        print(f"wall time: {time.time() - t0:.1f} s")
        return 0
    if args.command == "generate":
        from augment.export import class_folder, generate_more

        with using(args.run_dir, wait=args.wait, read_only=True):
            table = generate_more(args.run_dir, args.class_name, args.n, args.seed, args.out)
        print(f"{len(table)} samples of {args.class_name!r} in {Path(args.out) / class_folder(args.class_name)} "
              f"(provenance: {Path(args.out) / 'provenance.parquet'})")
        return 0
    if args.command == "push":
        from augment.publish import push as push_dataset

        with using(args.run_dir, wait=args.wait, read_only=True):
            files = push_dataset(RunFolder(args.run_dir).dataset.path, args.repo_id, local_target=args.to_folder,
                                 private=args.private)
        print(f"{len(files)} files ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}) -> "
              f"{args.to_folder or 'https://huggingface.co/datasets/' + args.repo_id}")
        return 0
    if args.command == "export":
        from augment.export import export_model

        with using(args.run_dir, wait=args.wait, read_only=True):
            out = export_model(args.run_dir, args.out)
        print(f"diffusers checkpoint and model card in {out}")
        return 0
    if args.command == "deploy":
        from flows.deployments import deploy

        cfg = load_config(args.config, args.overrides)
        check_base(cfg.base)
        dep_id = deploy(cfg, args.pool, name=args.name, cron=args.cron, trigger_event=args.trigger_event,
                        limit=args.limit, source=args.source, image=args.image)
        print(f"deployment augment/{args.name or cfg.name} ({dep_id}) on work pool {args.pool!r}; start a worker: "
              f"prefect worker start --pool {args.pool}")
        return 0
    if args.command == "serve":
        from flows.deployments import serve

        serve(load_config(args.config, args.overrides), name=args.name, cron=args.cron,
              trigger_event=args.trigger_event, limit=args.limit)
        return 0
    return 1


def _api_gone(err: BaseException) -> BaseException | None:
    """The connection error behind `err` when the Prefect server went away mid-run (Prefect retried it for about a
    minute first), else None."""
    import httpx

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, httpx.TransportError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class _UserErrorsOnce(logging.Filter):
    """A user error raised in a stage (a full disk, a worker that kept dying) is printed by `main` as one `error:`
    line; Prefect's console would print it three times first, twice with a traceback. Only the console is
    filtered: the API's logs (the UI) keep every record."""

    MARKS = ("failed with exception", "Finished in state Failed", "Encountered exception")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            return False
        msg = record.getMessage()
        return not (any(m in msg for m in self.MARKS) and any(n in msg for n in user_error_names()))


def _quiet_user_errors() -> None:
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and \
                not any(isinstance(f, _UserErrorsOnce) for f in handler.filters):
            handler.addFilter(_UserErrorsOnce())


def _run_flow(cfg, wait: bool) -> Metrics:
    from flows.server import PrefectAPI

    # Prefect's API server (a temporary one unless PREFECT_API_URL is set) starts now, on the other core, while
    # the flow's imports (torch, diffusers: ~6 s) load here
    api = PrefectAPI(say=lambda s: print(s, file=sys.stderr))
    from flows.augment_flow import augment_flow

    _quiet_user_errors()

    _stop_on_sigterm()
    # the API answers, then the lock, before the flow starts: a server that cannot start or a folder in use is
    # one line (and the first leaves nothing written), not a crashed flow run
    with api.active(), lock(claim(cfg.publish.output_dir, cfg.data.source, cfg.name), wait=wait):
        return augment_flow.with_options(retries=0)(config=cfg, wait=wait)


def _verdict_line(metrics: Metrics) -> str:
    """The report's verdict line, as plain text, for the metrics a run or a report build returned."""
    from augment.report.sections import headline

    return headline(metrics).replace("**", "")


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler or `kill`) stops a run like Ctrl-C: stages stop, the lock is released, the folder is
    left resumable. Without this the process ignored it."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    sys.unraisablehook = _redeliver_stops(sys.unraisablehook)


def _redeliver_stops(previous):
    """An unraisable-exception hook that delivers a stop again. Python runs a signal's handler wherever the main
    thread is, and the exception it raises (Ctrl-C's KeyboardInterrupt; SIGTERM's, as ours or Prefect's bridge
    raises it during a task) is swallowed when that is inside a `__del__` ("Exception ignored in"): seen, one
    SIGTERM in three landed in a garbage collection of `regex` objects during fine-tuning, and the run trained on.
    The stop is raised once more in the main thread a moment later, from another thread (raised from here, it would
    land in this hook and be swallowed as well); anything else goes to `previous`."""
    import _thread
    import signal
    import threading

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        signum = getattr(exc, "signal", None) if not isinstance(exc, Exception) else None
        if isinstance(exc, KeyboardInterrupt) or isinstance(signum, int):
            signum = signum if isinstance(signum, int) else signal.SIGINT
            again = threading.Timer(0.1, _thread.interrupt_main, (signum,))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    return hook


if __name__ == "__main__":
    sys.exit(main())
