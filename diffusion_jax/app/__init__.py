"""A web page (Gradio) for generating, editing and comparing samplers in the browser.

    python -m diffusion_jax.app --workdir=demo_t2i/t2i        # or --checkpoint=SD_DIR
    make app                                                  # the demo model, if built

Modules: :mod:`.engine` (the loaded model, one generation at a time), :mod:`.progress`
(step progress from inside the compiled chain), :mod:`.handlers` (what each button does,
testable without a browser), :mod:`.metadata` (parameters in PNG text), :mod:`.ui` (the
Gradio page) and :mod:`.__main__` (the command line). Nothing in the library imports this
package; it needs the ``app`` extra (``pip install -e .[app]``).
"""
