"""`merge continual ...` and `merge serve`: sequential merging into a persistent state, from the
shell or over HTTP."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, clean, fmt_bytes, handle_errors, say, stdout_console


continual_app = typer.Typer(help="Sequential merging into a persistent, crash-safe state.", no_args_is_help=True)
app.add_typer(continual_app, name="continual")


@continual_app.command("init")
@handle_errors
def continual_init(
    state: Path = typer.Argument(..., help="State directory to create."),
    recipe: Path = typer.Option(..., "--recipe", help="Recipe: a method that folds one model at a time (`merge methods`: opcm, magmax, linear, task_arithmetic, model_stock, ram, ...), base, parameters, optional initial models."),
    force: bool = typer.Option(False, "--force", help="Merge a model even if the same tensors were merged before."),
    retain: Optional[int] = typer.Option(None, "--retain", help="Versions to keep (tagged ones are kept too; "
                                         "default: the recipe's retain, else 3)."),
    gate_ratio: Optional[float] = typer.Option(None, "--gate-max-norm-ratio",
                                               help="Refuse a model whose task-vector norm in some tensor group is "
                                               "more than this factor from the running median (e.g. 5)."),
    gate_command: Optional[str] = typer.Option(None, "--gate-command",
                                               help="Shell command run on each candidate's export ({path}); the "
                                               "model is merged only if it exits 0."),
    removable: bool = typer.Option(False, "--removable", help="linear / task_arithmetic: keep the running sum in "
                                   "float64 so that `continual remove` subtracts a model exactly."),
    window: Optional[int] = typer.Option(None, "--window", help="linear / task_arithmetic: keep only the last N "
                                         "models (implies --removable)."),
):
    """Create a continual-merging state; merge the recipe's models (if any) in order (all or nothing)."""
    from .. import continual

    gate = {k: v for k, v in (("max_norm_ratio", gate_ratio), ("command", gate_command)) if v is not None}
    st = continual.init(state, recipe, on_model=lambda e: stdout_console().print(f"merged {e['name']} as model {e['t']}"),
                        force=force, retain=retain, gate=gate, removable=removable, window=window)
    stdout_console().print(f"created {state} ({st.method}, {st.t} model(s) merged)")


@continual_app.command("add")
@handle_errors
def continual_add(
    state: Path = typer.Argument(..., help="State directory."),
    model: str = typer.Argument(..., help="Checkpoint directory, file or hub id."),
    name: Optional[str] = typer.Option(None, "--name", help="Label recorded in the history."),
    weight: Optional[float] = typer.Option(None, "--weight", help="Per-model weight (linear, task_arithmetic)."),
    force: bool = typer.Option(False, "--force", help="Merge even if the same tensors were merged before."),
):
    """Fold one model into the state (one streaming pass; atomic switch to the new version). It goes
    through the state's queue: with a `merge serve` running, its worker merges it and this waits."""
    from .. import continual

    params = {"weight": weight} if weight is not None else {}
    entry = continual.queued_add(state, model, name=name, force=force, params=params,
                                 on_wait=lambda j: say(f"queued as job {j['id']}; waiting for the server's worker",
                                                             err=True))
    stdout_console().print(f"merged {entry['name']} as model {entry['t']} (sha256 {entry['sha256'][:12]})")


@continual_app.command("status")
@handle_errors
def continual_status(state: Path = typer.Argument(..., help="State directory."),
                     as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Method, models merged (name, source, sha256, time), scalars, disk use."""
    import json

    from .. import continual

    s = continual.status(state)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    c = stdout_console()
    say(f"{s['method']} {s['parameters']}, base {s['base_model']}", f"{clean(s['state'])}:", console=c)
    c.print(f"models merged: {s['models_merged']}   scalars: {s['scalars']}   disk: {fmt_bytes(s['disk_bytes'])}")
    for h in s["history"]:
        c.print(f"  {h['t']:>3}  {h['name']}  {h['source']}  sha256 {h['sha256'][:12]}  {h['time']}")


@continual_app.command("export")
@handle_errors
def continual_export(state: Path = typer.Argument(..., help="State directory."),
                     out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
                     overwrite: bool = typer.Option(False, "--overwrite",
                                                    help="Replace an existing output that mergekit-ortho wrote."),
                     force_replace: bool = typer.Option(False, "--force-replace",
                                                        help="Replace an existing output even if mergekit-ortho did "
                                                        "not write it.")):
    """Write the current merged model as a normal model directory."""
    from .. import continual

    result = continual.export(state, out, overwrite, force_replace=force_replace)
    stdout_console().print(f"wrote {result}")


@continual_app.command("remove")
@handle_errors
def continual_remove(state: Path = typer.Argument(..., help="State directory."),
                     name: str = typer.Argument(..., help="The model's name in the history, or #t.")):
    """Subtract one model from a removable linear / task_arithmetic state (exact; a new version)."""
    from .. import continual

    r = continual.remove(state, name)
    stdout_console().print(f"removed {r['removed']}; {r['t']} model(s) remain (version {r['version']})")


@continual_app.command("versions")
@handle_errors
def continual_versions(state: Path = typer.Argument(..., help="State directory."),
                       as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """The versions kept (oldest first): models merged, time, tags, disk use; * marks the current one."""
    import json

    from .. import continual

    vs = continual.list_versions(state)
    if as_json:
        typer.echo(json.dumps(vs, indent=2))
        return
    c = stdout_console()
    for v in vs:
        tags = f"  tags: {', '.join(v['tags'])}" if v["tags"] else ""
        c.print(f"{'*' if v['current'] else ' '} {v['version']}  {v['t']:>3} model(s)  {fmt_bytes(v['disk_bytes'])}"
                f"  {v['time']}{tags}")


@continual_app.command("promote")
@handle_errors
def continual_promote(state: Path = typer.Argument(..., help="State directory."),
                      version: str = typer.Argument(..., help="A kept version: v000003, 3 or a tag.")):
    """Make a kept version the current one (roll back or forward); later adds continue from it."""
    from .. import continual

    r = continual.promote(state, version)
    stdout_console().print(f"current version is now {r['version']} ({r['t']} model(s))")


@continual_app.command("tag")
@handle_errors
def continual_tag(state: Path = typer.Argument(..., help="State directory."),
                  version: str = typer.Argument(..., help="A kept version: v000003, 3 or a tag."),
                  name: str = typer.Argument(..., help="The tag; a tagged version is never swept.")):
    """Tag a kept version so that retention keeps it."""
    from .. import continual

    r = continual.tag(state, version, name)
    stdout_console().print(f"tagged {r['version']} as {r['tag']}")


@continual_app.command("watch")
@handle_errors
def continual_watch(state: Path = typer.Argument(..., help="State directory."),
                    inbox: Path = typer.Option(..., "--inbox", help="Directory where new checkpoints appear."),
                    interval: float = typer.Option(2.0, "--interval", help="Seconds between polls."),
                    incomplete_timeout: float = typer.Option(
                        3600.0, "--incomplete-timeout",
                        help="Seconds to wait for an incomplete checkpoint (missing shards) to change before "
                        "giving up on it (logged; retried if its files change later)."),
                    server: Optional[str] = typer.Option(None, "--server",
                                                         help="Post each checkpoint to this `merge serve` URL's "
                                                         "queue instead of merging it here."),
                    token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                              help="Bearer token for --server.")):
    """Merge each complete checkpoint that appears in the inbox, in arrival order, until SIGTERM/Ctrl-C."""
    import signal

    from .. import continual

    stop = {"flag": False}

    def _stop(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    c = stdout_console()
    c.print(f"watching {inbox} for checkpoints (every {interval:g}s); Ctrl-C or SIGTERM to stop")
    submit = None
    if server:
        token = _read_token(token_file) if token_file else None
        submit = continual.poster(server, token)
    n = continual.watch(state, inbox, interval, log=lambda m: c.print(m), should_stop=lambda: stop["flag"],
                        incomplete_timeout=incomplete_timeout, submit=submit)
    c.print(f"stopped; {n} model(s) merged")


@app.command("serve")
@handle_errors
def serve(state: Path = typer.Argument(..., help="State directory (`merge continual init`)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; other than loopback needs "
                                   "--token-file."),
          port: int = typer.Option(8321, "--port", help="Port (0: any free one, logged)."),
          token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                    help="File holding the bearer token every request must send."),
          retain: Optional[int] = typer.Option(None, "--retain", help="Versions to keep (tagged ones too)."),
          log_format: str = typer.Option("json", "--log-format", help="json (one object a line) or text.")):
    """Serve continual merging over HTTP: a job queue, versions, metrics (needs the serve extra)."""
    from ..continual import server

    server.serve(state, host, port, token_file, retain, log_format, read_token=_read_token)


def _read_token(path: Path) -> str:
    from ..errors import UserError

    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UserError(f"--token-file {path}: cannot read it ({e.strerror or e})") from None
    if len(token) < 16:
        raise UserError(f"--token-file {path}: the token must be at least 16 characters")
    return token
