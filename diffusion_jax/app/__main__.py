"""Command line of the web app: load a model, build the page, serve it.

    python -m diffusion_jax.app --checkpoint=SD_DIR | --workdir=DIR [--host 127.0.0.1 --port 7860]

Without ``--checkpoint`` / ``--workdir`` it serves the ``make demo-t2i`` model
(``demo_t2i/t2i``) if it exists, else the ``make demo`` digits model (``demo/workdir``), else
says which make target builds one and exits with status 2. It binds to 127.0.0.1 unless
``--host`` says otherwise (another address prints a warning), and never opens a share link
or sends analytics.
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile

from absl import flags as absl_flags

from diffusion_jax.cli import flags

# Before gradio is imported: no telemetry or version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DEFAULT_WORKDIRS = (("demo_t2i/t2i", "make demo-t2i"), ("demo/workdir", "make demo"))
LOCALHOST = ("127.0.0.1", "localhost", "::1")
PROG = "python -m diffusion_jax.app"


def define_flags(fv) -> None:
    """Registers the command-line flags (see the module docstring) on ``fv``."""
    flags.define_checkpoint("Stable Diffusion directory (model_index.json).", flag_values=fv)
    flags.define_workdir("Training workdir (text-to-image or pixel model).", flag_values=fv)
    flags.define_step("Checkpoint step of --workdir.", flag_values=fv)
    absl_flags.DEFINE_string("host", "127.0.0.1", "Address to bind (default local).",
                             flag_values=fv)
    absl_flags.DEFINE_integer("port", 7860, "Port (default 7860).", flag_values=fv)
    flags.define_out("Folder for the generated PNGs (default: a new temp folder).",
                     flag_values=fv)
    absl_flags.mark_flags_as_mutual_exclusive(["checkpoint", "workdir"], flag_values=fv)


def default_source(root: str = ".") -> str | None:
    """The first demo workdir that exists under ``root``, or ``None``."""
    for workdir, _ in DEFAULT_WORKDIRS:
        if os.path.isdir(os.path.join(root, workdir)):
            return os.path.join(root, workdir)
    return None


def host_warning(host: str) -> str | None:
    """A warning for a non-local bind address, else ``None``."""
    if host in LOCALHOST:
        return None
    return (f"WARNING: serving on {host}: anyone who can reach this machine on that address "
            "can use the model (there is no login). Use --host 127.0.0.1 to keep it local.")


def launch(demo, host: str, port: int, *, block: bool = True):
    """Serves ``demo`` with the queue on (one generation at a time), offline-safe settings."""
    from diffusion_jax.app import ui  # pylint: disable=g-import-not-at-top

    demo.queue(default_concurrency_limit=1)
    extra = {}
    if "_frontend" in inspect.signature(demo.launch).parameters:
        # Skips gradio's one-shot 3 s HEAD probe of our own URL, which exists to send hosted
        # notebooks to share links and fails spuriously on a busy host (seen on 2 loaded cores).
        extra["_frontend"] = False
    return demo.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                       ssr_mode=False, pwa=False, mcp_server=False, quiet=not block,
                       prevent_thread_lock=not block, show_error=True, theme=ui.theme(),
                       footer_links=[], **extra)


def main(argv=None) -> int:
    """Entry point; returns the exit status (``argv``: the arguments after the program name)."""
    return flags.run_in_process(define_flags, _serve, sys.argv[1:] if argv is None else argv,
                                prog=PROG, doc=__doc__)


def _serve(args) -> int:
    """Loads the model of ``args`` (parsed flags) and serves it; returns the exit status."""
    workdir, checkpoint = args.workdir, args.checkpoint
    if workdir is None and checkpoint is None:
        workdir = default_source()
        if workdir is None:
            targets = " or ".join(f"'{target}' (writes {path})"
                                  for path, target in DEFAULT_WORKDIRS)
            print(f"No model to serve: pass --checkpoint=DIR or --workdir=DIR, or build a demo "
                  f"model first with {targets}.", file=sys.stderr)
            return 2
        print(f"Serving {workdir}")
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    from diffusion_jax.app import engine, ui  # pylint: disable=g-import-not-at-top

    try:
        model = engine.load_engine(checkpoint_dir=checkpoint, workdir=workdir, step=args.step)
    except (ValueError, FileNotFoundError) as err:
        print(flags.error_line(err, PROG), file=sys.stderr)
        return 1
    out_dir = args.out or tempfile.mkdtemp(prefix="diffusion_jax_app_")
    launch(ui.build(model, out_dir), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
