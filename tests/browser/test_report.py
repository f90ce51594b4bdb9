"""The `perlwb report` page in headless Chromium, opened as a file with every network request blocked:
it draws the stored run, its sliders replay the stored frames, and no request leaves the machine."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

from perl.viz.report import write_report

from .pages import assert_close, figure, press_to_index

pytestmark = pytest.mark.browser

BOKEH_READY_JS = "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].roots().length > 0"


def section(page, heading: str):
    return page.locator(".bk-panel-models-layout-Column", has=page.get_by_role("heading", name=heading))


def spectra_at(page, sp: xr.Dataset, module: str, step: int) -> np.ndarray:
    """The 'Spectra of every layer' image at ``step`` is the stored singular values (layer x index)."""
    fig = figure(page, rf"^{re.escape(module)}: product singular values of every layer at step {step}$")
    image = fig.glyph("Image")["image"][0]
    assert_close(
        image,
        sp["singular_values"].sel(module=module, step=step).transpose("layer", "sv").values,
        f"spectra of every layer at step {step}",
    )
    return image


def test_report_in_chromium_offline(tracked_run, browser_page, tmp_path):
    with xr.open_dataset(tracked_run / "spectral_history_final.nc") as ds:
        sp = ds.load()
    module, steps = str(sp["module"].values[0]), [int(s) for s in sp["step"].values]
    assert len(steps) <= 50, "the shared run is short enough for the report to keep every step"
    path = write_report(tracked_run, tmp_path / "report.html")

    page = browser_page.open(path.as_uri(), allow=("file://",))
    page.wait_for_function(BOKEH_READY_JS)
    spectra = section(page, "Spectra of every layer")
    spectra.scroll_into_view_if_needed()
    last = spectra_at(page, sp, module, steps[-1])
    browser_page.shot("report_start", spectra, docs_name="report.png")

    step = steps[len(steps) // 2]
    press_to_index(spectra.locator(".noUi-handle"), steps.index(step))
    moved = spectra_at(page, sp, module, step)
    assert not np.allclose(moved, last), f"the frame at step {step} is the frame at step {steps[-1]}"
    browser_page.shot("report_step", spectra)

    trajectories = section(page, "Singular-value trajectories")
    trajectories.scroll_into_view_if_needed()
    layer = int(sp["layer"].values[-1])
    press_to_index(trajectories.locator(".noUi-handle"), sp.sizes["layer"] - 1)
    lines = figure(page, rf"^{re.escape(module)}, layer {layer}: singular values over training").glyph("MultiLine")
    assert len(lines["ys"]) == sp.sizes["sv"], f"{len(lines['ys'])} trajectories drawn for rank {sp.sizes['sv']}"
    for i, ys in enumerate(lines["ys"]):
        assert_close(
            ys,
            sp["singular_values"].sel(module=module, layer=layer).isel(sv=i).values,
            f"trajectory σ{i}, layer {layer}",
        )
    browser_page.shot("report_layer", trajectories)

    outside = [u for u in browser_page.requests if not u.startswith(("file://", "data:", "blob:"))]
    assert outside == [] and browser_page.blocked == [], (
        f"requests left the machine: {outside or browser_page.blocked}"
    )
    assert browser_page.page_errors == [], f"JavaScript errors in the report: {browser_page.page_errors}"
