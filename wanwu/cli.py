"""`wanwu`: the command line. Heavy libraries are imported inside commands so `wanwu --help` answers at once."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="wanwu",
    help=(
        "万物 wanwu: turn a folder of unlabeled images into a deployed, Chinese-labelled object detector, "
        "and keep it fresh.\n\n"
        "Start with `wanwu doctor` (is everything ready?), then `wanwu run` (the whole pipeline on params.yaml). "
        "`wanwu stage NAME` runs one stage (what `dvc repro` calls)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Stage(str, Enum):
    collect = "collect"
    autolabel = "autolabel"
    quality = "quality"
    train = "train"
    distill = "distill"
    evaluate = "evaluate"
    export = "export"
    promote = "promote"


ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="the params file; its folder is the project root", show_default=True)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="override a param for this run, e.g. -S train.epochs=3 (repeatable)"),
]
ProfileOpt = Annotated[
    Path | None,
    typer.Option(
        "--profile",
        help="a file of dotted-key overrides (params/cpu60.yaml, params/gpu.yaml); --set wins over it",
        exists=True,
        dir_okay=False,
    ),
]


def _profile(path: Path | None) -> dict[str, str]:
    """A profile file's ``key.sub: value`` lines as ``--set`` strings (values re-dumped as YAML)."""
    if path is None:
        return {}
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise typer.BadParameter(f"{path}: not valid YAML ({e})", param_hint="--profile") from None
    if not isinstance(raw, dict):
        raise typer.BadParameter(f"{path}: expected `section.key: value` lines", param_hint="--profile")
    return {
        str(k): yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()
        for k, v in raw.items()
    }


def _overrides(items: list[str] | None, profile: Path | None = None) -> dict[str, str]:
    out: dict[str, str] = _profile(profile)
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE, e.g. train.epochs=3", param_hint="--set")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _load(params_path: Path, sets: list[str] | None, profile: Path | None = None):
    from wanwu.config import ParamsError, load_params
    from wanwu.offline import harden

    try:
        params = load_params(params_path, _overrides(sets, profile))
    except ParamsError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    harden(params_path.resolve().parent)
    return params


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, profile: ProfileOpt = None) -> None:
    """Run the whole pipeline flow (collect → … → promote) as far as its stages exist.

    Profiles: `--profile params/cpu60.yaml` (the CPU hour: about 54 minutes on 2 cores, README),
    `--profile params/gpu.yaml`.
    """
    p = _load(params, set_, profile)
    from flows.pipeline import pipeline
    from tasks.promote import GATE_EXIT, gate_failures

    try:
        pipeline(params_path=str(params.resolve()), overrides=_overrides(set_, profile))
    except gate_failures() as e:  # the gate's decision, not a crash: its reason, no traceback (as `wanwu stage`)
        typer.secho(f"promote: {e}", fg="red", err=True)
        raise typer.Exit(GATE_EXIT) from None
    _ = p


@app.command()
def stage(
    name: Annotated[Stage, typer.Argument(help="the stage to run; the same name as in dvc.yaml and params.yaml")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one stage without Prefect (this is what each `dvc.yaml` stage calls)."""
    p = _load(params, set_)
    import importlib

    try:
        module = importlib.import_module(f"tasks.{name.value}")
    except ModuleNotFoundError:
        typer.secho(f"stage {name.value!r} is not built yet (no tasks/{name.value}.py).", fg="red", err=True)
        raise typer.Exit(2) from None
    from wanwu.locks import StageLocked, stage_lock

    try:
        with stage_lock(params.resolve().parent, name.value):
            module.run_stage(p)
    except StageLocked as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(75) from None  # EX_TEMPFAIL: try again later
    except OSError as e:
        full = _disk_full(e)
        if full is None:
            raise
        typer.secho(
            f"stage {name.value}: {full} while writing under the data folder {p.project.data_dir}. Free space "
            f"there (`df -h {p.project.data_dir}`) and run the stage again: it resumes from what it had completed.",
            fg="red",
            err=True,
        )
        raise typer.Exit(74) from None  # EX_IOERR


def _disk_full(e: BaseException) -> str | None:
    """'no space left on device (<file>)' when ``e`` or what caused it is a full disk, quota or file-size limit."""
    import errno

    codes = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large",
    }
    seen: BaseException | None = e
    chain: set[int] = set()
    while seen is not None and id(seen) not in chain:
        chain.add(id(seen))
        if isinstance(seen, OSError):
            what = codes.get(seen.errno or 0) or next((v for v in codes.values() if v in str(seen).lower()), None)
            if what:
                return f"{what} ({seen.filename})" if seen.filename else what
        seen = seen.__cause__ or seen.__context__
    return None


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _dvc(args: list[str]) -> int:
    """``dvc <args>`` from this environment, after healing what a killed ``dvc`` can leave behind: a half-written
    ``.dvc/tmp/rwlock`` (any DVC command that runs stages reads it: repro, exp run) or a cut-off ``dvc.lock``."""
    import subprocess

    from wanwu.locks import heal_dvc_lockfile, heal_dvc_rwlock

    for heal in (heal_dvc_rwlock, heal_dvc_lockfile):
        healed = heal(Path.cwd())
        if healed:
            typer.secho(healed, fg="yellow", err=True)
    beside = Path(sys.executable).with_name("dvc")  # this environment's dvc, as `wanwu stage` is this one's
    return subprocess.call([str(beside) if beside.exists() else "dvc", *args])


@app.command(context_settings=_PASS_THROUGH)
def repro(ctx: typer.Context) -> None:
    """`dvc repro` (any of its arguments after this), after healing what a killed `dvc` can leave behind.

    A `dvc repro` killed while DVC rewrote `.dvc/tmp/rwlock` leaves that file half-written, and plain `dvc repro`
    then refuses to start until it is deleted by hand; this removes it (under DVC's own guard) and says so. One
    killed while it rewrote `dvc.lock` leaves that cut off: the stage entries it cut are dropped (they run again).
    Run it in the project's root, as `dvc repro`: `wanwu repro`, `wanwu repro evaluate`, `wanwu repro --dry`.
    """
    raise typer.Exit(_dvc(["repro", *ctx.args]))


@app.command(context_settings=_PASS_THROUGH)
def dvc(ctx: typer.Context) -> None:
    """Any `dvc` command, with the same healing as `wanwu repro`: `wanwu dvc exp run --run-all` (what `make sweep`
    runs)."""
    raise typer.Exit(_dvc(ctx.args))


@app.command()
def doctor(params: ParamsOpt = Path("params.yaml")) -> None:
    """Say what is ready and what is not (offline mode, font, stores, device, disk), with the fix for each."""
    from wanwu.offline import doctor as run_doctor

    ok = run_doctor(params.resolve().parent, params)
    raise typer.Exit(0 if ok else 1)


@app.command()
def serve(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="serve this .onnx file (hot-reloaded when replaced), not the registry"),
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default: serve.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: serve.port)")] = None,
) -> None:
    """Serve the registry's champion over HTTP: POST /recognize, GET /health, GET /metrics, /docs.

    The API token, when wanted, comes from the environment ($WANWU_API_TOKEN by default), never from a file.
    """
    p = _load(params, set_)
    from wanwu.serve import ServeError
    from wanwu.serve import run as run_server

    try:
        run_server(p, params.resolve().parent, model=model, host=host, port=port)
    except ServeError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def history(
    params: ParamsOpt = Path("params.yaml"),
    limit: Annotated[int, typer.Option(help="most recent decisions to show")] = 50,
) -> None:
    """List every promotion decision (promoted, refused, rolled back) with its figures and reason."""
    _load(params, None)
    from rich.console import Console
    from rich.table import Table

    from wanwu import registry

    rows = registry.history()[-limit:]
    champ, prev = registry.get_alias(registry.CHAMPION), registry.get_alias(registry.PREVIOUS)
    table = Table(
        title=f"{registry.model_name()}: champion {champ.version if champ else '-'}, "
        f"previous {prev.version if prev else '-'}"
    )
    for col in ("when (UTC)", "decision", "version", "champion", "mAP50-95 cand / champ", "reason"):
        table.add_column(col, overflow="fold")
    colour = {"promoted": "green", "refused": "red", "rolled_back": "yellow", "manual_rollback": "yellow"}
    for r in rows:
        f = r["figures"]
        cand, ch = f.get("candidate_mAP50_95"), f.get("champion_mAP50_95")
        figs = " / ".join("-" if v is None else f"{v:.4f}" for v in (cand, ch)) if cand or ch else ""
        move = f"{r['champion_before'] or '-'} → {r['champion_after'] or '-'}"
        c = colour.get(r["decision"], "white")
        table.add_row(r["decided_at"][:19], f"[{c}]{r['decision']}[/]", r["version"], move, figs, r["reason"])
    Console().print(table if rows else "no decisions recorded yet")


@app.command()
def rollback(
    params: ParamsOpt = Path("params.yaml"),
    reason: Annotated[str, typer.Option(help="why; recorded in the history")] = "manual rollback",
) -> None:
    """Move the `champion` alias back to `previous` by hand (recorded as manual_rollback)."""
    _load(params, None)
    from wanwu import registry

    try:
        d = registry.rollback(reason, automatic=False)
    except registry.RegistryError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"champion: version {d.champion_before} → {d.champion_after} ({reason})")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
