"""`perlwb report RUN_DIR`: one self-contained HTML page of a run, sliders included.

The page needs no server, no kernel and no network: Bokeh's and Panel's JavaScript is inlined,
the gradient PNGs are embedded as base64, and every slider state is precomputed (Panel's embed:
each section's widgets are crossed and the figure changes for every combination are stored in the
page). Sections are embedded independently, so the page holds the sum of the sections' states, not
their product. Long runs are subsampled to ``max_frames`` steps per slider, and the page says so.

Usage:
    perlwb report runs/demo                        # -> runs/demo/report.html
    perlwb report runs/demo --output r.html --max-steps 100
    >>> from perl.viz.report import write_report; write_report("runs/demo")
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
import warnings
from pathlib import Path

import numpy as np

from perl.cli_support import OneLineParser, fail, parse_or_fail, positive_int
from perl.fileio import atomic_write_text
from perl.run import MissingDataWarning, Run, RunError, metric_name
from perl.viz.explorers import GRADIENT_VARIABLES, PRODUCT, SPECTRAL_HEATMAP_METRICS, UPDATE
from perl.viz.views import HeatmapView, LinesView, axis_label, category_colors, depth_colors

__all__ = ["write_report", "check_output_path", "main", "subsample", "DEFAULT_MAX_FRAMES"]

DEFAULT_MAX_FRAMES = 50
_MAX_STATES = 5000  # per section; a larger cross product would make a page of many megabytes
_EXTERNAL_TAG = re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']https?://[^>]*>\s*", re.IGNORECASE)


def subsample(n: int, max_frames: int) -> np.ndarray:
    """Indices of at most ``max_frames`` evenly spaced items of ``n``, first and last included."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}.")
    if n <= max_frames:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_frames)).astype(int))


def write_report(run_dir, out_html=None, max_frames: int = DEFAULT_MAX_FRAMES) -> Path:
    """Write the run's self-contained HTML report and return its path.

    Args:
        run_dir (str | Path | Run): the run folder (or an opened run).
        out_html (str | Path, optional): the file to write; default ``<run_dir>/report.html``.
        max_frames (int, default 50): most steps a step slider offers (evenly subsampled, first
            and last kept). Heatmaps over steps use the same steps.
    """
    # note: the run and the output are checked before the (slow) plotting imports
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    out = check_output_path(run, out_html)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingDataWarning)
        spectral, gradients, metrics = run.spectral, run.gradients, run.metrics

    import panel as pn
    from bokeh.document import Document
    from bokeh.resources import INLINE
    from panel.config import config
    from panel.io.embed import embed_state
    from panel.io.model import add_to_doc
    from panel.io.resources import Resources, set_resource_mode
    from panel.io.save import file_html
    from pyviz_comms import Comm

    sections, notes = [], []
    if spectral is not None:
        sp = _subsampled(spectral, max_frames, "Spectral", notes, "--max-steps sets how many")
        if "singular_values" in sp:  # IA3 / LayerNorm tuning store norms only
            sections += [_spectra_section(sp), _trajectory_section(sp)]
        sections.append(_spectral_heatmap_section(sp))
        if "rank_budget" in sp:
            sections.append(_rank_budget_section(spectral))
    if gradients is not None:
        gr = _subsampled(gradients, max_frames, "Gradient", notes)
        sections += [_gradient_heatmap_section(gr), _depth_section(gr)]
        if {"A", "B"} <= {str(c) for c in gr["component"].values}:
            sections.append(_ab_section(gr))
    sections = [s for s in sections if s is not None]
    if not sections and metrics is None:
        raise RunError(f"Run {run.path} has nothing to report: no spectral, gradient or metrics data.")

    header = pn.pane.HTML(_header_html(run, spectral, gradients, notes), sizing_mode="stretch_width")
    static = [header]
    if metrics is not None:
        static.append(_training_section(metrics))
    pngs = _png_section(run)

    doc, comm = Document(), Comm()
    doc.title = f"perlwb report: {run.name}"
    with config.set(embed=True, safe_embed=True):
        for part in static:
            add_to_doc(part.get_root(doc, comm), doc)
        for section in sections:
            root = section.get_root(doc, comm)
            # safe_embed: every state stores all it sets, so any state can follow any other
            embed_state(section, root, doc, max_states=_MAX_STATES, progress=False)
        if pngs is not None:
            add_to_doc(pngs.get_root(doc, comm), doc)
    _inline_panel_stylesheets(doc)
    resources = Resources.from_bokeh(INLINE, absolute=True)
    with set_resource_mode("inline"):
        page = file_html(doc, resources, doc.title)
    page = _EXTERNAL_TAG.sub("", page)  # the template's favicon links point at a CDN
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, page)  # note: a failed write leaves nothing behind


def _subsampled(ds, max_frames: int, what: str, notes: list[str], hint: str = ""):
    """``ds`` at most ``max_frames`` steps (evenly, first and last kept); a note says so when it drops any."""
    keep = subsample(ds.sizes["step"], max_frames)
    if len(keep) < ds.sizes["step"]:
        notes.append(
            f"{what} steps: showing {len(keep)} of {ds.sizes['step']} stored steps "
            f"(evenly subsampled, first and last kept{'; ' + hint if hint else ''})."
        )
    return ds.isel(step=keep)


def check_output_path(run: Run, out_html=None) -> Path:
    """Where the report goes: an ``.html`` file that is not a folder and not one of the run's own files.

    Raises:
        RunError: ``out_html`` names a folder, a file that is not HTML (``config.yaml`` ...), or
            sits below a file.
    """
    out = Path(out_html).expanduser() if out_html is not None else run.path / "report.html"
    if out.is_dir():
        raise RunError(f"--output {out} is a folder; name the HTML file to write, e.g. {out / 'report.html'}.")
    if out.suffix.lower() not in (".html", ".htm"):
        # note: so a report can never replace a run's config.yaml, metrics or stores
        raise RunError(
            f"--output {out} does not end in .html; name an HTML file (the report never replaces other files)."
        )
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"--output {out} cannot be written: {probe} is a file, not a folder; name another file.")
    return out


def _inline_panel_stylesheets(doc) -> None:
    """Replace the stylesheets Panel's widgets import from cdn.holoviz.org by inline copies of the
    same files shipped in the panel package (one copy per file), so the page opens without network."""
    from bokeh.models import ImportedStyleSheet, InlineStyleSheet, UIElement
    from panel.io.resources import CDN_DIST, DIST_DIR

    inlined = {}
    for root in doc.roots:
        for model in root.select({"type": UIElement}):
            sheets = list(model.stylesheets)
            for i, sheet in enumerate(sheets):
                url = sheet.url if isinstance(sheet, ImportedStyleSheet) else ""
                if url.startswith(CDN_DIST):
                    if url not in inlined:
                        path = DIST_DIR / url[len(CDN_DIST) :].split("?")[0]
                        inlined[url] = (
                            InlineStyleSheet(css=path.read_text(encoding="utf-8")) if path.is_file() else sheet
                        )
                    sheets[i] = inlined[url]
            if sheets != list(model.stylesheets):
                model.stylesheets = sheets


# ------------------------------------------------------------------------------ sections
def _section(title: str, text: str, controls: list, layout, update=None):
    """A titled block: text, a row of controls, the figure; ``update`` redraws it now and whenever a
    control changes."""
    import panel as pn

    if update is not None:
        for w in controls:
            w.param.watch(lambda event: update(), "value")
        update()
    return pn.Column(pn.pane.Markdown(f"### {title}\n{text}"), pn.Row(*controls), pn.pane.Bokeh(layout))


def _select(name, options):
    import panel as pn

    return pn.widgets.Select(label=name, options=options if isinstance(options, dict) else list(options))


def _slider(name, values):
    import panel as pn

    values = [int(v) for v in values]
    return pn.widgets.DiscreteSlider(label=name, options=values, value=values[-1], width=420)


def _spectra_section(sp):
    modules = [str(m) for m in sp["module"].values]
    kinds = {PRODUCT: "singular_values"}
    if "update_singular_values" in sp and not _update_is_product(sp):
        kinds[UPDATE] = "update_singular_values"
    arrays = {k: sp[v].transpose("step", "layer", "module", ...).values for k, v in kinds.items()}
    steps, layers = sp["step"].values, sp["layer"].values
    module_w, kind_w, step_w = _select("module", modules), _select("spectrum", list(kinds)), _slider("step", steps)
    # an image (layer x index) rather than one line per layer: one array per state keeps the page small
    view = HeatmapView(
        "spectra",
        "singular value index (0 = largest)",
        axis_label(sp["layer"], "layer"),
        width=620,
        height=340,
        x_name="index",
        y_name="layer",
    )
    view.vspan.visible = view.hspan.visible = False

    def update():
        arr = arrays[kind_w.value]
        s, m = int(np.flatnonzero(steps == step_w.value)[0]), modules.index(module_w.value)
        view.set_data(
            arr[s, :, m, :],
            np.arange(arr.shape[-1]),
            layers,
            "singular value",
            title=f"{module_w.value}: {kind_w.value} singular values of every layer at step {step_w.value}",
        )

    controls = [module_w, kind_w, step_w] if len(kinds) > 1 else [module_w, step_w]
    text = "Singular values of the adapter for each layer (rows) at the chosen step"
    text += (
        ", of the product s·B·A or of the update since initialisation."
        if len(kinds) > 1
        else ". (The update since initialisation equals the product for this run: B·A started at zero.)"
    )
    return _section("Spectra of every layer", text, controls, view.figure, update)


def _update_is_product(sp) -> bool:
    """True when B0·A0 = 0 (LoRA-like init): the update's spectrum is the product's plus zeros."""
    prod, upd = sp["singular_values"].values, sp["update_singular_values"].values
    r = prod.shape[-1]
    if upd.shape[-1] < r:
        return False
    with np.errstate(invalid="ignore"):
        rest = upd[..., r:]
        return bool(
            np.allclose(upd[..., :r], prod, rtol=1e-4, atol=1e-7, equal_nan=True)
            and np.all((np.abs(rest) <= 1e-6 * (np.nanmax(np.abs(prod)) or 1)) | np.isnan(rest))
        )


def _trajectory_section(sp):
    modules = [str(m) for m in sp["module"].values]
    layers = [int(v) for v in sp["layer"].values]
    arr = sp["singular_values"].transpose("step", "layer", "module", ...).values
    steps = sp["step"].values
    module_w, layer_w = _select("module", modules), _slider("layer", layers)
    layer_w.value = layers[0]
    view = LinesView(
        "singular values over training",
        axis_label(sp["step"], "step"),
        axis_label(sp["singular_values"], "singular_values"),
        width=620,
        height=340,
    )
    k = arr.shape[-1]

    def update():
        m, l = modules.index(module_w.value), layers.index(layer_w.value)
        view.set_lines(
            [steps] * k,
            [arr[:, l, m, i] for i in range(k)],
            colors=depth_colors(k),
            labels=[f"σ{i}" for i in range(k)],
        )
        view.figure.title.text = (
            f"{module_w.value}, layer {layer_w.value}: singular values over training (dark = largest)"
        )

    return _section(
        "Singular-value trajectories",
        "Each singular value of one adapter over the (subsampled) steps.",
        [module_w, layer_w],
        view.figure,
        update,
    )


def _heatmap_options(ds, names):
    return {axis_label(ds[n], n): n for n in names}


def _spectral_heatmap_section(sp):
    modules = [str(m) for m in sp["module"].values]
    order = ("step", "layer", "module")
    names = []
    for base in SPECTRAL_HEATMAP_METRICS:
        for name in (base, f"update_{base}"):
            if name in sp and set(sp[name].dims) == set(order):
                names.append(name)
    if not names:
        return None
    options = _heatmap_options(sp, names)
    arrays = {n: sp[n].transpose(*order).values for n in names}
    steps, layers = sp["step"].values, sp["layer"].values
    metric_w, module_w = _select("metric", options), _select("module", modules)
    view = HeatmapView(
        "metric", axis_label(sp["step"], "step"), axis_label(sp["layer"], "layer"), width=620, height=340
    )

    def update():
        n, m = metric_w.value, modules.index(module_w.value)
        view.set_data(
            arrays[n][:, :, m].T,
            steps,
            layers,
            axis_label(sp[n], n),
            title=f"{axis_label(sp[n], n)}, {module_w.value}",
        )

    view.vspan.visible = view.hspan.visible = False
    return _section(
        "Spectrum metrics, layer x step",
        "Effective rank (participation ratio and entropy), stable rank, "
        "condition number and more, for the product and the update since init. Missing values are blank.",
        [metric_w, module_w],
        view.figure,
        update,
    )


def _rank_budget_section(spectral):
    import panel as pn

    total = spectral["rank_budget"].sum("layer", skipna=True, min_count=1)
    modules = [str(m) for m in total["module"].values]
    view = LinesView(
        "AdaLoRA rank budget (sum over layers)",
        axis_label(spectral["step"], "step"),
        "rank budget",
        legend=True,
        width=620,
    )
    view.set_lines(
        [spectral["step"].values] * len(modules),
        [total.sel(module=m).values for m in modules],
        colors=category_colors(len(modules)),
        labels=modules,
    )
    return pn.Column(pn.pane.Markdown("### AdaLoRA rank budget\nEvery stored step."), pn.pane.Bokeh(view.figure))


def _gradient_heatmap_section(gr):
    order = ("step", "layer", "module", "component")
    names = [n for n in GRADIENT_VARIABLES if n in gr and set(gr[n].dims) == set(order)]
    arrays = {n: gr[n].transpose(*order).values for n in names}
    modules, components = [str(m) for m in gr["module"].values], [str(c) for c in gr["component"].values]
    steps, layers = gr["step"].values, gr["layer"].values
    var_w, comp_w, module_w = (
        _select("variable", _heatmap_options(gr, names)),
        _select("component", components),
        _select("module", modules),
    )
    view = HeatmapView(
        "gradient", axis_label(gr["step"], "step"), axis_label(gr["layer"], "layer"), log=True, width=620, height=340
    )
    view.vspan.visible = view.hspan.visible = False

    def update():
        n, c, m = var_w.value, components.index(comp_w.value), modules.index(module_w.value)
        view.set_data(
            arrays[n][:, :, m, c].T,
            steps,
            layers,
            axis_label(gr[n], n),
            title=f"{axis_label(gr[n], n)}: {comp_w.value}, {module_w.value} (log colour)",
        )

    return _section(
        "Gradient flow, layer x step",
        "Gradient norm (accumulated, before clipping), gradient/weight and "
        "update/weight ratios per adapter component. Log colour scale: zero is blank.",
        [var_w, comp_w, module_w],
        view.figure,
        update,
    )


def _depth_section(gr):
    modules, components = [str(m) for m in gr["module"].values], [str(c) for c in gr["component"].values]
    arr = gr["grad_norm"].transpose("step", "layer", "module", "component").values
    steps, layers = gr["step"].values, gr["layer"].values
    module_w, step_w = _select("module", modules), _slider("step", steps)
    view = LinesView(
        "depth profile",
        axis_label(gr["layer"], "layer"),
        axis_label(gr["grad_norm"], "grad_norm"),
        y_log=True,
        legend=True,
        width=620,
        height=340,
    )

    def update():
        s, m = int(np.flatnonzero(steps == step_w.value)[0]), modules.index(module_w.value)
        view.set_lines(
            [layers] * len(components),
            [arr[s, :, m, c] for c in range(len(components))],
            colors=category_colors(len(components)),
            labels=components,
        )
        view.figure.title.text = f"{module_w.value}: gradient norm by layer at step {step_w.value}"

    return _section(
        "Gradient depth profile",
        "Gradient norm of every component against depth, at the chosen step.",
        [module_w, step_w],
        view.figure,
        update,
    )


def _ab_section(gr):
    modules = [str(m) for m in gr["module"].values]
    g = gr["grad_norm"]
    a = g.sel(component="A").transpose("step", "layer", "module").values.astype(float)
    b = g.sel(component="B").transpose("step", "layer", "module").values.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(b > 0, a / b, np.nan)
    steps, layers = gr["step"].values, gr["layer"].values
    module_w = _select("module", modules)
    view = HeatmapView(
        "A/B", axis_label(gr["step"], "step"), axis_label(gr["layer"], "layer"), log=True, width=620, height=340
    )
    view.vspan.visible = view.hspan.visible = False

    def update():
        m = modules.index(module_w.value)
        view.set_data(
            ratio[:, :, m].T, steps, layers, "‖∇A‖ / ‖∇B‖", title=f"‖∇A‖ / ‖∇B‖, {module_w.value} (log colour)"
        )

    return _section(
        "A/B gradient ratio",
        "Ratio of the gradient norms of A and B. At LoRA's initialisation B = 0, "
        "so A gets no gradient (ratio 0, blank on the log scale) until B has moved.",
        [module_w],
        view.figure,
        update,
    )


def _training_section(metrics):
    import panel as pn
    from bokeh.layouts import row

    steps = metrics["step"].values
    figures = []
    rewards = [k for k in metrics.data_vars if k == "reward" or (k.startswith("rewards.") and k.endswith(".mean"))]
    if rewards:
        view = LinesView("reward", axis_label(metrics["step"], "step"), "reward", legend=True, width=460)
        view.set_lines(
            [steps] * len(rewards),
            [metrics[k].values for k in rewards],
            colors=category_colors(len(rewards)),
            labels=[metrics[k].attrs.get("long_name", k) for k in rewards],
        )
        figures.append(view.figure)
    for key in ("completions/mean_length", "kl", "entropy", "loss"):
        name = metric_name(key)
        if name in metrics:
            view = LinesView(
                key,
                axis_label(metrics["step"], "step"),
                axis_label(metrics[name], name),
                width=300,
                x_range=figures[0].x_range if figures else None,
            )
            view.set_lines([steps], [metrics[name].values], colors="black", labels=[key])
            figures.append(view.figure)
    return pn.Column(
        pn.pane.Markdown("### Training\nTrainer logs at every logged step."), pn.pane.Bokeh(row(*figures))
    )


def _png_section(run: Run):
    import panel as pn

    folder = run.tracking_dir / "gradient_logs"
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pngs:
        return None
    images = "".join(
        f"<figure style='display:inline-block;margin:4px'><img alt='{html.escape(p.name)}' style='max-width:560px' "
        f"src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'/>"
        f"<figcaption>{html.escape(p.name)}</figcaption></figure>"
        for p in pngs
    )
    return pn.pane.HTML(f"<h3>Gradient logs (PNG)</h3>{images}", sizing_mode="stretch_width")


def _header_html(run: Run, spectral, gradients, notes) -> str:
    attrs = (
        (spectral if spectral is not None else gradients).attrs
        if (spectral is not None or gradients is not None)
        else {}
    )
    rows = [
        ("run", run.path),
        ("PEFT method", run.method),
        ("rank r", run.r),
        ("lora_alpha", attrs.get("lora_alpha")),
        ("scaling", attrs.get("scaling")),
        ("model", attrs.get("model_name_or_path") or (run.config.get("model") or {}).get("model_name_or_path")),
        ("seed", run.seed),
    ]
    if spectral is not None:
        rows.append(
            (
                "spectral steps",
                f"{int(spectral['step'][0])} .. {int(spectral['step'][-1])} ({spectral.sizes['step']} stored)",
            )
        )
        rows.append(
            (
                "layers x modules",
                f"{spectral.sizes['layer']} x {spectral.sizes['module']} ({', '.join(map(str, spectral['module'].values))})",
            )
        )
    if gradients is not None:
        rows.append(
            (
                "gradient steps",
                f"{int(gradients['step'][0])} .. {int(gradients['step'][-1])} ({gradients.sizes['step']} stored)",
            )
        )
    table = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in rows
        if v is not None
    )
    note = "".join(f"<p class='perl-note'><b>Note:</b> {html.escape(n)}</p>" for n in notes)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"<h1>perlwb report: {html.escape(run.name)}</h1><table>{table}</table>{note}"
        f"<p style='color:#666'>Written {stamp} by <code>perlwb report</code>; self-contained (no network, no kernel): "
        f"the sliders replay precomputed states. Open the run in a notebook "
        f"(<code>SpectralExplorer(perl.open_run(...))</code>) for every step.</p>"
    )


# ------------------------------------------------------------------------------ command line
def main(argv=None) -> int:
    """``perlwb report RUN_DIR [--output FILE] [--max-steps N]``; exit 2 with one line on a user error."""
    parser = OneLineParser(prog="perlwb report", description="Write a self-contained HTML report of a run.")
    parser.add_argument("run_dir", help="the run folder (training.output_dir)")
    parser.add_argument("--output", "-o", default=None, help="HTML file to write (default RUN_DIR/report.html)")
    parser.add_argument(
        "--max-steps",
        type=positive_int,
        default=DEFAULT_MAX_FRAMES,
        help=f"most steps per slider; longer runs are subsampled evenly (default {DEFAULT_MAX_FRAMES})",
    )
    args = parse_or_fail(parser, argv)
    if isinstance(args, int):
        return args
    try:
        path = write_report(args.run_dir, args.output, max_frames=args.max_steps)
    except RunError as err:
        return fail(str(err), prog=parser.prog)
    except OSError as err:
        return fail(
            f"cannot write {args.output or 'the report'} ({err.strerror or err}); name another --output.",
            prog=parser.prog,
        )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
