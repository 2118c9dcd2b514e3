"""`grove`: validate and run Olive configs, generate from the results, lay out projects, build tiny models."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

from olive_grove.tasks.errors import NoCredentials, UserError, UserErrors
from olive_grove.tasks.storage import is_url

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def console() -> None:
    """The `grove` command: main, then an exit that drops the heap instead of collecting it (0.4 s of
    every command; exit handlers, such as Prefect's log flush, still run)."""
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    from olive_grove.tasks.quiet import quiet_library_defaults

    # Without PREFECT_API_URL each run starts Prefect's temporary local server; on a busy 2-core machine
    # (or with several runs starting together) it needs longer than Prefect's default 20 s to come up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    quiet_library_defaults()
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted: run it again to go on (finished steps come from the cache, training from its last "
              "checkpoint)", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    except UserError as exc:
        for error in exc.errors if isinstance(exc, UserErrors) else [exc]:
            print(f"error: {_with_block_hint(error).line()}", file=sys.stderr)
        return EXIT_USER_ERROR


def _with_block_hint(error: UserError) -> UserError:
    """Missing storage credentials can also come from the block this CLI saves."""
    if not isinstance(error, NoCredentials):
        return error
    from olive_grove.blocks.azure import SAVE_HINT

    return NoCredentials(error.where, error.problem, f"{error.hint}, {SAVE_HINT}" if error.hint else SAVE_HINT)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="grove", description=__doc__)
    commands = root.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    for name, handler, help in (
        ("validate", cmd_validate, "check a config (and its model and data) without running anything"),
        ("run", cmd_run, "run the config's passes as a Prefect flow, reusing cached steps"),
        ("submit", cmd_submit, "send the run to the work pool of the config's host system (needs a server)"),
    ):
        sub = command(name, handler, help)
        sub.add_argument("--config", required=True, type=Path, help="an Olive run config, JSON or YAML")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a key of the normalised config, e.g. passes.lora.training_args.max_steps=5",
        )
    commands.choices["validate"].add_argument("--print", action="store_true", help="print the normalised config")

    sub = command("infer", cmd_infer, "generate from an ONNX model, a merged model, or an adapter folder")
    sub.add_argument("model", type=Path, help="onnx/<precision>-<ep>/, merged/ or adapter/ of an output folder")
    prompts = sub.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts-file", type=Path, help="one prompt per line, plain or a JSON string")
    sub.add_argument("--max-new-tokens", type=_positive, default=32)
    sub.add_argument("--base", help="base model of an adapter, if its adapter_config.json names none")
    sub.add_argument("--adapter", help="an ONNX model's adapter (adapters/NAME.onnx_adapter) to generate with")
    sub.add_argument("--ep", choices=["cpu"], help="run an ONNX model on the CPU, whatever it was built for")

    sub = command("init", cmd_init, "lay out a project like Olive's E2E sample, with a config in it")
    sub.add_argument("dir", type=Path)

    sub = command("tiny-model", cmd_tiny_model, "build a tiny random model with a tokenizer trained on the spot")
    sub.add_argument("dir", type=Path)
    sub.add_argument("--arch", choices=["phi3", "llama"], default="phi3")
    sub.add_argument(
        "--corpus",
        type=Path,
        action="append",
        default=[],
        help="text or JSON Lines files to train the tokenizer on (default: the tone dataset)",
    )
    blocks = commands.add_parser("blocks", help="Prefect blocks for credentials").add_subparsers(
        required=True, metavar="ACTION"
    )
    sub = blocks.add_parser("register", help="register the Azure and Redis block types with the Prefect API")
    sub.set_defaults(handler=cmd_blocks_register)
    sub = blocks.add_parser(
        "set-hf-token", help="store a Hugging Face token (read from HF_TOKEN or stdin) in Secret block 'hf-token'"
    )
    sub.set_defaults(handler=cmd_blocks_set_hf_token)
    sub = blocks.add_parser(
        "set-azure-storage",
        help="store an Azure Storage connection string (read from AZURE_STORAGE_CONNECTION_STRING or stdin) "
        "in block 'azure-storage'",
    )
    sub.set_defaults(handler=cmd_blocks_set_azure_storage)
    sub = blocks.add_parser(
        "set-locks",
        help="store the Redis server whose locks machines sharing a cache use, in RedisDatabase block "
        "'olive-grove-locks'",
    )
    sub.add_argument("url", help="redis://HOST:6379/0; '-' reads it from stdin, for a URL with a password "
                     "(redis://:PASSWORD@HOST:6379/0), which must not show in `ps`")  # fmt: skip
    sub.set_defaults(handler=cmd_blocks_set_locks)

    sub = command("server", cmd_server, "the Prefect UI for starting runs: a server, the work pool, the "
                  "deployments and a worker, until Ctrl-C")  # fmt: skip
    sub.add_argument("action", nargs="?", choices=["status", "stop"],
                     help="status: the local server grove run keeps; stop: stop it")  # fmt: skip
    sub.add_argument("--pool", default="local", help="the process work pool to serve (default: local)")
    sub.add_argument("--config", type=Path, help="the config the run form starts with (default: ./olive-config.json, "
                     "else the guide's); runs read relative paths from its folder")  # fmt: skip
    sub.add_argument("--with", dest="extras", default="", metavar="NAMES",
                     help="more deployments to register, comma-separated: nightly (the config at 02:00 UTC), "
                     "docker and k8s (the GPU deployments, with their pools)")  # fmt: skip

    cache = commands.add_parser("cache", help="list or prune cached step results").add_subparsers(
        required=True, metavar="ACTION"
    )
    for name, handler, help in (
        ("ls", cmd_cache_ls, "list cached step results with their sizes and ages"),
        ("verify", cmd_cache_verify, "check every cached step result against its manifest, hashing every file"),
        ("prune", cmd_cache_prune, "remove cached step results, by age or by the config that made them"),
    ):
        sub = cache.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--cache-dir", type=Path, help="the engine.cache_dir folder")
        where.add_argument("--config", type=Path, help="a config: its engine.cache_dir")
    prune = cache.choices["prune"]
    prune.add_argument("--older-than", type=_days, metavar="DAYS", help="entries written more than DAYS ago")
    prune.add_argument(
        "--only-config",
        action="store_true",
        help="with --config: only the entries its last run used (from its report.json)",
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    return root


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not math.isfinite(days) or days < 0:
        raise argparse.ArgumentTypeError(f"expected a number of days, 0 or more, got {text!r}")
    return days


def checked_config(args: argparse.Namespace, unchecked: list[UserError] | None = None):
    """The run options from `--set`, and the config they give, checked before any work (see
    check_before_work for `unchecked`)."""
    from olive_grove.flows.preflight import check_before_work
    from olive_grove.flows.run_setup import RunOptions, credentials_for, step_context

    options = RunOptions(overrides=args.overrides)
    cfg, notes = options.load(args.config)
    # Blocks live behind a Prefect API: validating starts none, so it reads them only from a server.
    blocks = unchecked is None or bool(os.environ.get("PREFECT_API_URL"))
    if not blocks and cfg.uses_azure_storage():
        notes.append("credentials in Prefect blocks are read by grove run (grove validate: with PREFECT_API_URL)")
    with credentials_for(cfg, lambda *_: None) if blocks else contextlib.nullcontext():
        check_before_work(cfg, step_context(cfg), unchecked)
    return options, cfg, notes


def cmd_validate(args: argparse.Namespace) -> int:
    unchecked: list[UserError] = []
    _, cfg, notes = checked_config(args, unchecked)
    for note in notes:
        print(f"note: {note}")
    for error in unchecked:  # not a mistake in the config; a run stops on it until it can be reached
        print(f"warning: not checked here: {_with_block_hint(error).line()}", file=sys.stderr)
    if args.print:
        print(json.dumps(cfg.model_dump(mode="json", exclude_none=True), indent=2))
    passes = ", ".join(f"{n} ({s.type})" for n, s in cfg.passes.items())
    left = f"; {len(unchecked)} not checked here (see the warnings)" if unchecked else ""
    print(f"{args.config}: valid ({passes}){left}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from olive_grove.flows import local_server

    starting = local_server.for_run(_note)  # a server that must start boots while the config is checked
    options, _, _ = checked_config(args)  # a bad config fails here, before any step starts
    with local_server.serving(starting, _note), local_server.terminal_run():
        from olive_grove.flows.finetune import finetune

        state = finetune(config=str(args.config.resolve()), **options.as_parameters(), return_state=True)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        if isinstance(error, UserError):
            raise error
        print(f"run failed: {state.message}", file=sys.stderr)
        return 1
    report = state.result()
    cached = report["cached_steps"]
    print(f"done in {report['total_seconds']} s; {len(cached)} of {len(report['steps'])} steps from cache")
    for name, path in report["outputs"].items():
        print(f"  {name}: {path}")
    return 0


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def cmd_server(args: argparse.Namespace) -> int:
    if args.action == "status":
        return cmd_server_status(args)
    if args.action == "stop":
        return cmd_server_stop(args)
    from olive_grove.flows.serve import parse_extras, serve

    return serve(args.pool, parse_extras(args.extras), args.config, print)


def cmd_server_status(args: argparse.Namespace) -> int:
    from olive_grove.flows import local_server

    configured = local_server.configured_api_url()
    server = local_server.recorded(local_server.prefect_home())
    if server is None:
        print("no local Prefect server kept by grove" + ("" if configured else "; the next grove run starts one"))
    else:
        state = "answering" if server.healthy() else "not answering (starting?)"
        print(f"local Prefect server: {server.ui} (pid {server.pid}, {state}); log: {server.log}")
    if configured:
        print(f"runs use PREFECT_API_URL={configured}, not the local server")
    return 0


def cmd_server_stop(args: argparse.Namespace) -> int:
    from olive_grove.flows import local_server

    server = local_server.stop(local_server.prefect_home())
    print(f"stopped the local Prefect server at {server.ui}" if server else "no local Prefect server was running")
    return 0


def cmd_blocks_register(args: argparse.Namespace) -> int:
    import subprocess

    # prefect-azure's blocks (storage and Azure ML credentials, container instance jobs) and prefect-redis's
    # RedisDatabase (shared step locks), so the UI can make them; Secret is built in.
    for module in ("prefect_azure", "prefect_redis"):
        code = subprocess.call([sys.executable, "-m", "prefect", "block", "register", "-m", module])
        if code:
            return code
    return 0


def cmd_blocks_set_azure_storage(args: argparse.Namespace) -> int:
    from olive_grove.blocks.azure import AZURE_STORAGE_BLOCK, save_azure_storage

    secret = os.environ.get("AZURE_STORAGE_CONNECTION_STRING") or sys.stdin.readline().strip()
    if not secret:
        raise UserError(
            "AZURE_STORAGE_CONNECTION_STRING", "no connection string given", "set it or pipe the string on stdin"
        )
    save_azure_storage(secret)
    print(f"saved AzureBlobStorageCredentials block '{AZURE_STORAGE_BLOCK}'")
    return 0


def cmd_blocks_set_locks(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    from olive_grove.blocks.locks import LOCKS_BLOCK, save_redis_locks

    save_redis_locks(sys.stdin.readline().strip() if args.url == "-" else args.url)
    # Where it went matters: machines that share a cache see it only on the server they all use.
    where = (
        PREFECT_API_URL.value()
        or f"this machine's Prefect database (no PREFECT_API_URL; {os.environ.get('PREFECT_HOME', '~/.prefect')})"
    )
    print(f"saved RedisDatabase block '{LOCKS_BLOCK}' on {where}: runs whose cache_dir is a URL lock steps there")
    return 0


def cmd_blocks_set_hf_token(args: argparse.Namespace) -> int:
    from olive_grove.blocks.hub import HF_TOKEN_BLOCK, save_hf_token

    # Never from the command line: arguments show in `ps` and shell history.
    token = os.environ.get("HF_TOKEN") or sys.stdin.readline().strip()
    if not token:
        raise UserError("HF_TOKEN", "no token given", "set HF_TOKEN or pipe the token on stdin")
    save_hf_token(token)
    print(f"saved Secret block '{HF_TOKEN_BLOCK}'")
    return 0


def _cache_entries(args: argparse.Namespace):
    from olive_grove.tasks.step_cache import list_cache

    cfg = None
    if args.config:
        from olive_grove.flows.config import load_run_config

        cfg, _ = load_run_config(args.config)
    folder = _cache_folder(args, cfg)
    if not (folder / "steps").is_dir():
        raise UserError(str(folder), "is not a step cache (it has no steps/ folder)", "has the config run here yet?")
    return list_cache(folder), cfg


def _cache_folder(args: argparse.Namespace, cfg) -> Path:
    if args.cache_dir:
        return args.cache_dir
    from olive_grove.flows.run_setup import step_context

    return Path(step_context(cfg).cache_dir)  # a shared cache: this machine's copy of it


def cmd_cache_ls(args: argparse.Namespace) -> int:
    entries, _ = _cache_entries(args)
    now = time.time()
    for entry in entries:
        age = (now - entry.modified) / 86400
        print(f"{entry.step:18} {entry.key:52} {_size(entry.size_bytes):>9} {age:6.1f} days")
    print(f"{len(entries)} entries, {_size(sum(e.size_bytes for e in entries))}")
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from olive_grove.tasks.step_cache import damage, remove_entry

    entries, _ = _cache_entries(args)
    damaged = 0
    for entry in entries:
        problem = damage(entry.folder, thorough=True)
        if problem:
            damaged += 1
            remove_entry(entry)  # a damaged entry is never served: the next run computes it again
            print(f"removed {entry.step}/{entry.key}: {problem}")
    print(f"{len(entries)} entries checked, {damaged} damaged and removed")
    return 1 if damaged else 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from olive_grove.tasks.step_cache import leftovers, remove_entry, remove_folder

    entries, cfg = _cache_entries(args)
    entries_dir = _cache_folder(args, cfg)
    if args.only_config:
        if cfg is None:
            raise UserError("--only-config", "needs --config")
        report = Path(cfg.engine.output_dir) / "report.json"
        if is_url(cfg.engine.output_dir):
            raise UserError("--only-config", "reads report.json from a local engine.output_dir", "use --older-than")
        if not report.is_file():
            raise UserError(str(report), "no report: this config has not run", "run it, or prune by --older-than")
        used = {Path(s["path"]).name for s in json.loads(report.read_text())["steps"]}
        entries = [e for e in entries if e.key in used]
    if args.older_than is not None:
        entries = [e for e in entries if time.time() - e.modified > args.older_than * 86400]
    elif not args.only_config:
        raise UserError("cache prune", "says nothing to prune", "give --older-than DAYS or --config F --only-config")
    verb = "would remove" if args.dry_run else "removed"
    for entry in entries:
        print(f"{verb} {entry.step}/{entry.key} ({_size(entry.size_bytes)})")
        if not args.dry_run:
            remove_entry(entry)
    left = (
        []
        if args.older_than is None
        else [p for p in leftovers(Path(entries_dir)) if time.time() - p.stat().st_mtime > args.older_than * 86400]
    )
    for path in left:
        print(f"{verb} {path.relative_to(entries_dir)} (left by a run that failed or was stopped)")
        if not args.dry_run:
            remove_folder(path)
    print(f"{len(entries)} entries, {_size(sum(e.size_bytes for e in entries))}")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_submit(args: argparse.Namespace) -> int:
    from olive_grove.flows.submit import submit

    options, cfg, _ = checked_config(args)
    deployment, run_id, outputs = submit(cfg, str(args.config.resolve()), options)
    print(f"submitted flow run {run_id} of {deployment}; its outputs go to {outputs} (on the worker's machine)")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from olive_grove.tasks.inference import generate

    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise UserError(str(args.prompts_file), "no such file")
        try:
            lines = args.prompts_file.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise UserError(str(args.prompts_file), "is not UTF-8 text", "save it as UTF-8") from None
        prompts = [_prompt(line) for line in lines if line.strip()]
        if not prompts:
            raise UserError(str(args.prompts_file), "holds no prompt", "one prompt per line")
    else:
        prompts = [args.prompt]
    outputs = generate(args.model, prompts, args.max_new_tokens, args.base, args.adapter, on_cpu=args.ep == "cpu")
    for prompt, text in zip(prompts, outputs):
        print(json.dumps({"prompt": prompt, "output": text}, ensure_ascii=False))
    return 0


def _prompt(line: str) -> str:
    """A prompt line is plain text, or a JSON string when it needs newlines ("### Text: ...\\n")."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return line
    return value if isinstance(value, str) else line


def cmd_init(args: argparse.Namespace) -> int:
    from olive_grove.flows.project import init_project

    for path in init_project(args.dir):
        print(path)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from olive_grove.flows.project import corpus_lines
    from olive_grove.tasks.tiny_model import build_tiny_model

    out = build_tiny_model(args.dir, args.arch, corpus_lines(args.corpus))
    print(f"tiny {args.arch} model in {out}")
    return 0


if __name__ == "__main__":
    console()
