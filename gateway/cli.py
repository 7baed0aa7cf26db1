"""`fairway`: serve the gateway, check a config, or run one simulated engine."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop
from aiohttp import web

from gateway.config.schema import ConfigError, load


def _serve(args: argparse.Namespace) -> int:
    from gateway.http.app import build_app
    from gateway.http.serve import serve
    from gateway.obs.logs import configure

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"fairway: invalid configuration {args.config}:", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return 2
    if cfg.planner.enabled:
        from gateway.config.planner import missing_extra

        why = missing_extra(cfg.planner.actuator.kind)
        if why is not None:
            print(f"fairway serve: [planner] enabled, but {why}", file=sys.stderr)
            return 2
    configure(cfg.log_level)
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port
    if args.workers < 1:
        print("fairway serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        from gateway.http.workers import refusal, supervise

        why = refusal(cfg, args.workers, port)
        if why is not None:
            print(f"fairway serve: {why}", file=sys.stderr)
            return 2
        print(f"fairway: serving on http://{host}:{port} ({len(cfg.engines)} engines, "
              f"{args.workers} workers)", file=sys.stderr)  # fmt: skip
        return supervise(["--config", args.config, "--host", host, "--port", str(port)],
                         args.workers)  # fmt: skip
    print(f"fairway: serving on http://{host}:{port} ({len(cfg.engines)} engines)", file=sys.stderr)
    app = build_app(cfg, config_path=args.config)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(app, host, port, cfg.server.backlog, reuse_port=args.reuse_port))
    return 0


def _check(args: argparse.Namespace) -> int:
    if args.path and args.config and Path(args.path).resolve() != Path(args.config).resolve():
        print(f"fairway check-config: two config files given ({args.path} and --config "
              f"{args.config}); give one", file=sys.stderr)  # fmt: skip
        return 2
    path = args.path or args.config or "config.toml"
    try:
        cfg = load(path)
    except ConfigError as exc:
        for err in exc.errors:
            print(f"{path}: {err}", file=sys.stderr)
        return 2
    regions = sorted({e.region for e in cfg.engines})
    print(
        f"{path}: ok: {len(cfg.tenants)} tenants, {len(cfg.engines)} engines, "
        f"models {', '.join(cfg.models)}, regions {', '.join(regions)}"
    )
    return 0


def _sim(args: argparse.Namespace) -> int:
    from engines.sim.engine import SimEngineConfig
    from engines.sim.server import build_app
    from gateway.obs.logs import configure

    configure("info")
    cfg = SimEngineConfig(
        model=args.model,
        arch=args.arch or args.model,
        gpu=args.gpu,
        tp=args.tp,
        time_scale=args.time_scale,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        seed=args.seed,
        api_key=args.api_key,
    )
    try:
        app = build_app(cfg)
    except KeyError as exc:
        print(f"fairway sim: {exc.args[0]}", file=sys.stderr)
        return 2
    print(f"fairway sim: {cfg.model} on {cfg.tp} x {cfg.gpu} at http://{args.host}:{args.port}",
          file=sys.stderr)  # fmt: skip
    web.run_app(app, host=args.host, port=args.port, backlog=args.backlog,
                handler_cancellation=True, access_log=None,
                print=None, loop=uvloop.new_event_loop())  # fmt: skip
    return 0


def _train_router(args: argparse.Namespace) -> int:
    from gateway.lengths.train import format_report, train_and_report

    try:
        report = train_and_report(args.logs, args.output, holdout=args.holdout,
                                  quantile=args.quantile, rounds=args.rounds)  # fmt: skip
    except (OSError, ValueError) as exc:
        print(f"fairway train-router: {exc}", file=sys.stderr)
        return 2
    print(f"held-out {args.holdout:.0%} of the logs:")
    print(format_report(report, args.quantile))
    print(f"model written to {args.output}")
    return 0


def _engine(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from engines import vllm_launch

    name = f"fairway engine {args.kind}"
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"{name}: invalid configuration {args.config}:", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return 2
    e = next((e for e in cfg.engines if e.id == args.engine and e.kind == "vllm"), None)
    if e is None:
        known = [e.id for e in cfg.engines if e.kind == "vllm"]
        print(f"{name}: {args.config} has no vllm engine {args.engine!r}; it has {known}",
              file=sys.stderr)  # fmt: skip
        return 2
    python = e.vllm_python or sys.executable
    engine = vllm_launch.Engine(
        served_model=e.model, model=e.model_path or e.model, url=e.url, python=python,
        api_key=e.api_key, tp=e.tp, max_num_seqs=e.max_num_seqs,
        max_batched_tokens=e.max_batched_tokens, extra_args=(*e.vllm_args, *args.vllm_args),
        host=args.host,
    )  # fmt: skip
    try:
        probe = subprocess.run([python, "-c", vllm_launch.PROBE], capture_output=True,
                               text=True, timeout=300, check=True)  # fmt: skip
        launch = vllm_launch.build(engine, vllm_launch.read_probe(probe.stdout), os.environ)
    except subprocess.CalledProcessError as exc:
        print(f"{name}: {python} cannot run vLLM:\n{exc.stderr[-2000:]}", file=sys.stderr)
        return 2
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(launch.render())
        return 0
    sys.stdout.flush()
    os.execvpe(launch.argv[0], list(launch.argv), {**os.environ, **launch.env})


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    from gateway.plan import add_arguments

    add_arguments(p)


def _plan(args: argparse.Namespace) -> int:
    from gateway.config.planner import missing_extra
    from gateway.plan import run

    why = missing_extra()
    if why is not None:
        print(f"fairway plan: {why}", file=sys.stderr)
        return 2
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", default="config.toml")
    p.add_argument("--host", default=None, help="override server.host")
    p.add_argument("--port", type=int, default=None, help="override server.port")
    p.add_argument("--workers", type=int, default=1,
                   help="gateway processes on the port (SO_REUSEPORT); more than 1 needs "
                        '[state] backend = "redis"')  # fmt: skip
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_serve)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    # A positional path, as `promtool check config` takes it; --config, as `serve` takes it.
    p.add_argument("path", nargs="?", default=None, help="the config file (default config.toml)")
    p.add_argument("--config", default=None, help="the config file, as serve takes it")
    p.set_defaults(func=_check)

    p = sub.add_parser("sim", help="run one simulated vLLM engine")
    p.add_argument("--model", default="llama-3.1-8b", help="name it serves under")
    p.add_argument("--arch", default=None, help="performance-model preset (default: --model)")
    p.add_argument("--gpu", default="H100")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply modelled step times (0.01 runs 100x faster)")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backlog", type=int, default=2048, help="pending connections")
    p.set_defaults(func=_sim)

    p = sub.add_parser("train-router", help="train the output-length model on feature logs")
    p.add_argument("logs", nargs="+", help="feature log files or directories")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.add_argument("--holdout", type=float, default=0.2, help="share held out, newest last")
    p.add_argument("--quantile", type=float, default=0.9, help="the upper quantile")
    p.add_argument("--rounds", type=int, default=300, help="boosting rounds per model")
    p.set_defaults(func=_train_router)

    p = sub.add_parser("plan", help="one plan from a live gateway's demand or a demand file")
    _plan_arguments(p)
    p.set_defaults(func=_plan)

    p = sub.add_parser("engine", help="start an engine of a config file")
    kinds = p.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("vllm", help="a vLLM OpenAI server (exec'd, so signals reach it)")
    p.add_argument("--config", default="config.toml")
    p.add_argument("--engine", required=True, help="the engine's id")
    p.add_argument("--host", default=None, help="listen address (default: the url's host)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("vllm_args", nargs="*", help="after --: more vLLM server flags")
    p.set_defaults(func=_engine)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
