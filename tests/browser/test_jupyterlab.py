"""The explorer notebooks in a real JupyterLab, in headless Chromium, moved the way a researcher does.

Each test opens a notebook (parametrized with the session's shared run), runs all cells from the
Run menu, and reads back what the page draws: the Bokeh figures' data from BokehJS's documents in
the page and the explorer's text line. After each slider or dropdown move the drawn values must be
the run's stored values for the new selection, read here from the netCDF files with xarray.
No request may leave the machine: BokehJS fetched from a CDN leaves every figure blank offline.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import xarray as xr

from .pages import assert_close, figure, press_to_index, widget

pytestmark = pytest.mark.browser

KERNEL_IDLE = re.compile(r"Python 3 \(ipykernel\) \| Idle")
# every code cell has run, or one failed (Run All stops at an error: report it at once)
ALL_CELLS_RUN_JS = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  const stderr = [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')];
  return stderr.some(o => o.textContent.includes('Traceback'))
      || (prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)));
}"""


def run_all_cells(page) -> None:
    """Run > Run All Cells once the kernel is idle; wait until every code cell has run (or one failed)."""
    page.get_by_text(KERNEL_IDLE).wait_for()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
    page.wait_for_function(ALL_CELLS_RUN_JS)
    page.get_by_text(KERNEL_IDLE).wait_for()


def assert_no_error_outputs(page) -> None:
    """No cell shows a traceback (JupyterLab renders errors as stderr) or a Python exception line."""
    stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    errors = [t for t in stderr if "Traceback" in t] + [t for t in outputs if re.search(r"\b\w*Error: ", t)]
    assert not errors, "error outputs in the notebook:\n" + "\n---\n".join(t[-1500:] for t in errors)


def info_text(page, expect: str) -> str:
    """The explorer's text line once it states ``expect`` (a regex), whitespace normalised."""
    line = page.locator(".perl-info")
    line.filter(has_text=re.compile(expect)).wait_for()
    return " ".join(line.inner_text().split())


def numbers(text: str) -> np.ndarray:
    return np.array([float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan", text)])


def explorer_output(page):
    return page.locator(".jp-CodeCell").last.locator(".jp-OutputArea")


def assert_clean(browser_page) -> None:
    assert browser_page.blocked == [], f"the page asked for URLs off this machine (blocked): {browser_page.blocked}"
    assert browser_page.page_errors == [], f"JavaScript errors in the page: {browser_page.page_errors}"


# ================================================================================ spectra
def check_spectral_selection(page, sp: xr.Dataset, module: str, layer: int, step: int) -> np.ndarray:
    """The spectrum, its faint history and the trajectories drawn for (module, layer, step) are the stored ones."""
    sv = sp["singular_values"].sel(module=module, layer=layer)
    r = sp.sizes["sv"]
    spectrum = figure(page, rf"^{re.escape(module)}, layer {layer}: product at step {step}$")
    points = spectrum.glyph("Scatter")
    assert len(points["y"]) == r, f"the spectrum shows {len(points['y'])} points, the adapter has rank {r}"
    assert_close(points["y"], sv.sel(step=step).values, f"spectrum points at layer {layer}, step {step}")
    assert_close(points["x"], np.arange(r), "spectrum x (singular value index)")
    lines = spectrum.glyph("MultiLine")
    assert lines["label"][-1] == f"step {step}", f"the bold line is {lines['label'][-1]!r}, expected step {step}"
    for label, ys in zip(lines["label"], lines["ys"]):
        earlier = int(label.removeprefix("step "))
        assert earlier <= step, f"the spectrum at step {step} draws a later step: {label}"
        assert_close(ys, sv.sel(step=earlier).values, f"spectrum line {label!r}")
    trajectories = figure(page, rf"^{re.escape(module)}, layer {layer}: singular values \(product\)$")
    traj = trajectories.glyph("MultiLine")
    assert len(traj["ys"]) == r, f"{len(traj['ys'])} trajectories drawn, the adapter has rank {r}"
    for i, (xs, ys) in enumerate(zip(traj["xs"], traj["ys"])):
        assert_close(xs, sp["step"].values, f"trajectory σ{i} steps")
        assert_close(ys, sv.isel(sv=i).values, f"trajectory σ{i} at layer {layer}")
    text = info_text(page, rf"layer {layer} \| module {re.escape(module)} \| step {step} \|")
    sigma = numbers(text[text.index("σ = [") + 5 : text.index("]")])
    assert_close(sigma, sv.sel(step=step).values, "σ in the text line", rtol=1e-3)
    return np.asarray(points["y"])


def test_spectral_explorer_in_jupyterlab(jupyterlab, browser_page, tracked_run):
    with xr.open_dataset(tracked_run / "spectral_history_final.nc") as ds:
        sp = ds.load()
    modules, layers, steps = (
        [str(m) for m in sp["module"].values],
        [int(v) for v in sp["layer"].values],
        [int(s) for s in sp["step"].values],
    )
    page = browser_page.open(jupyterlab.url("02_spectral_explorer.ipynb"), allow=(jupyterlab.base,))
    run_all_cells(page)
    assert_no_error_outputs(page)
    assert_clean(browser_page)  # before reading figures: a blocked BokehJS explains a blank page at once
    output = explorer_output(page)
    output.scroll_into_view_if_needed()

    # the documented start: first module, first layer, last stored step
    first = check_spectral_selection(page, sp, modules[0], layers[0], steps[-1])
    browser_page.shot("spectral_start", output, docs_name="spectral_explorer.png")

    step = steps[len(steps) // 2]
    press_to_index(widget(page, "widget-slider", "step").locator(".noUi-handle"), steps.index(step))
    moved = check_spectral_selection(page, sp, modules[0], layers[0], step)
    assert not np.allclose(moved, first), "the step slider moved but the spectrum did not change"
    browser_page.shot("spectral_step", output)

    press_to_index(widget(page, "widget-slider", "layer").locator(".noUi-handle"), len(layers) - 1)
    check_spectral_selection(page, sp, modules[0], layers[-1], step)
    browser_page.shot("spectral_layer", output)
    assert_clean(browser_page)


# ================================================================================ gradients
def positive(values) -> np.ndarray:
    """What a log-scale view can draw: values <= 0 are not drawable and shown as missing."""
    values = np.asarray(values, dtype=float)
    return np.where(values > 0, values, np.nan)


def check_gradient_selection(page, gr: xr.Dataset, component: str, module: str, layer: int, step: int) -> None:
    """The heatmap (component, module) and the depth profile at ``step`` are the stored gradient norms."""
    g = gr["grad_norm"].sel(module=module)
    name = gr["grad_norm"].attrs.get("long_name", "grad_norm")
    heatmap = figure(page, rf"^{re.escape(name)}: {re.escape(component)}, {re.escape(module)}$")
    image = heatmap.glyph("Image")["image"][0]
    assert_close(
        image,
        positive(g.sel(component=component).transpose("layer", "step").values),
        f"heatmap of {component}, {module} (layer x step)",
    )
    depth = figure(page, rf"^{re.escape(module)} at step {step}$").glyph("MultiLine")
    assert sorted(depth["label"]) == sorted(str(c) for c in gr["component"].values), (
        f"depth profile lines: {depth['label']}"
    )
    for label, xs, ys in zip(depth["label"], depth["xs"], depth["ys"]):
        assert_close(xs, gr["layer"].values, f"depth profile {label} layers")
        assert_close(
            ys, positive(g.sel(component=label, step=step).values), f"depth profile of {label} at step {step}"
        )
    text = info_text(
        page, rf"step {step} \| layer {layer} \| module {re.escape(module)} \| component {re.escape(component)} \|"
    )
    value = numbers(text.split("grad_norm = ")[1].split("|")[0])
    assert_close(
        value, [float(g.sel(component=component, layer=layer, step=step))], "grad_norm in the text line", rtol=1e-3
    )


def test_gradient_explorer_in_jupyterlab(jupyterlab, browser_page, tracked_run):
    with xr.open_dataset(tracked_run / "gradient_flow_final.nc") as ds:
        gr = ds.load()
    components, modules = [str(c) for c in gr["component"].values], [str(m) for m in gr["module"].values]
    layers, steps = [int(v) for v in gr["layer"].values], [int(s) for s in gr["step"].values]
    assert {"A", "B"} <= set(components), f"a LoRA run has A and B gradients, the store has {components}"
    page = browser_page.open(jupyterlab.url("03_gradient_explorer.ipynb"), allow=(jupyterlab.base,))
    run_all_cells(page)
    assert_no_error_outputs(page)
    assert_clean(browser_page)  # before reading figures: a blocked BokehJS explains a blank page at once
    output = explorer_output(page)
    output.scroll_into_view_if_needed()

    # the documented start: component A, first module, first layer, last step
    check_gradient_selection(page, gr, "A", modules[0], layers[0], steps[-1])
    browser_page.shot("gradient_start", output)

    widget(page, "widget-dropdown", "component").locator("select").select_option("B")
    check_gradient_selection(page, gr, "B", modules[0], layers[0], steps[-1])
    browser_page.shot("gradient_component", output)

    # the step with the largest total gradient (all-zero steps draw nothing on a log scale)
    total = gr["total_grad_norm"].values[:-1]
    step = steps[int(np.nanargmax(total))]
    press_to_index(widget(page, "widget-slider", "step").locator(".noUi-handle"), steps.index(step))
    check_gradient_selection(page, gr, "B", modules[0], layers[0], step)
    browser_page.shot("gradient_step", output, docs_name="gradient_explorer.png")
    assert_clean(browser_page)


# ================================================================================ live training
# the short name a line of the live plot has -> the Trainer's log key in metrics.jsonl
LIVE_KEYS = {
    "reward": "reward",
    "format_reward": "rewards/format_reward/mean",
    "equation_reward": "rewards/equation_reward/mean",
}


def read_metrics(path) -> dict[int, dict]:
    """metrics.jsonl by step (complete lines only: the run is still appending)."""
    import json

    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "reward" in record:
                records[int(record["step"])] = record
    return records


def test_training_notebook_draws_while_training(jupyterlab, browser_page):
    from .conftest import LIVE_RUN, LIVE_STEPS

    page = browser_page.open(jupyterlab.url("01_train_and_track.ipynb"), allow=(jupyterlab.base,))
    page.get_by_text(KERNEL_IDLE).wait_for()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
    training_cell = page.locator(".jp-CodeCell", has_text="LiveRewardPlot")

    # while the training cell runs: the plot holds >= 3 points, each the value metrics.jsonl has
    deadline = time.monotonic() + 240
    while True:
        try:
            lines = figure(page, r"^reward during training$", timeout=2).glyph("MultiLine")
        except AssertionError:
            lines = None
        if lines is not None and lines["xs"] and len(lines["xs"][0]) >= 3:
            break
        if time.monotonic() > deadline:
            training_cell.scroll_into_view_if_needed()
            browser_page.shot("training_cell_without_plot", training_cell)
            bokehjs = page.evaluate("() => window.Bokeh ? 'BokehJS ' + window.Bokeh.version : 'no BokehJS'")
            shown = training_cell.locator(".jp-OutputArea").inner_text()[:1500]
            pytest.fail(
                f"the live reward plot did not draw 3 points within 240 s of Run All; the page has "
                f"{bokehjs}, and the training cell shows: {shown!r}"
            )
        time.sleep(0.5)
    # note: the training cell's prompt, not the status bar: the widgets' own comm messages, answered
    # between training steps, flip the status bar to Idle while the cell still runs
    drawn_while = "*" in training_cell.locator(".jp-InputPrompt").inner_text()
    metrics = read_metrics(jupyterlab.root / LIVE_RUN / "metrics.jsonl")
    browser_page.shot("live_plot_while_training", training_cell)
    assert drawn_while, "the kernel was not busy when the points were read: the plot was not drawn during training"
    steps = [int(s) for s in lines["xs"][0]]
    assert len(steps) < LIVE_STEPS, f"all {len(steps)} steps were drawn at once: the plot did not draw while training"
    assert set(lines["label"]) == set(LIVE_KEYS), f"lines of the live plot: {lines['label']}"
    for label, xs, ys in zip(lines["label"], lines["xs"], lines["ys"]):
        assert [int(s) for s in xs] == steps, f"line {label} has steps {xs}, the reward line {steps}"
        missing = [s for s in steps if s not in metrics]
        assert not missing, f"the plot draws steps {missing} that metrics.jsonl does not have"
        assert_close(ys, [metrics[s][LIVE_KEYS[label]] for s in steps], f"live plot line {label}")

    # then the whole notebook finishes, with no error, no comm failure and no third-party noise
    page.wait_for_function(ALL_CELLS_RUN_JS, timeout=600_000)
    page.get_by_text(KERNEL_IDLE).wait_for()
    assert_no_error_outputs(page)
    assert_clean(browser_page)
    comm_errors = [c for c in browser_page.console if "Exception opening new comm" in c]
    assert not comm_errors, f"the browser console reports comm failures: {comm_errors[:3]}"
    outputs = " ".join(page.locator(".jp-OutputArea-output").all_inner_texts())
    assert "is_gradient_checkpointing" not in outputs, "the transformers deprecation warning reached the notebook"
    assert "Training Loss" not in outputs, "the Trainer's own step/loss table is shown under the plot"
    final = read_metrics(jupyterlab.root / LIVE_RUN / "metrics.jsonl")
    lines = figure(page, r"^reward during training$").glyph("MultiLine")
    assert [int(s) for s in lines["xs"][0]] == sorted(final), "after training the plot holds every logged step"
