"""perl.viz: plots draw the right slice, NaN stays missing, explorers follow their controls, the
report is one self-contained page with the expected slider states.

Expected values come from ``ds[...].sel(...)`` on the run's Datasets (or numpy on them), never from
the code under test.
"""

import html
import json
import re

import numpy as np
import pytest

from perl.run import open_run
from perl.synthetic import synthetic_run
from perl.viz import plots
from perl.viz.explorers import PRODUCT, UPDATE, GradientExplorer, RunComparison, SpectralExplorer
from perl.viz.report import main as report_main
from perl.viz.report import subsample, write_report
from perl.viz.static import save_gradient_pngs, save_png


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = synthetic_run(
        tmp_path_factory.mktemp("viz") / "lora",
        steps=8,
        layers=3,
        modules=("q_proj", "v_proj"),
        r=4,
        seed=0,
        partial=("k_proj",),
        pngs=False,
    )
    return open_run(d)


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    d = synthetic_run(
        tmp_path_factory.mktemp("viz") / "dora",
        steps=6,
        layers=4,
        modules=("q_proj", "o_proj"),
        r=4,
        seed=1,
        method="dora",
        pngs=False,
    )
    return open_run(d)


def _values(element, dim):
    return np.asarray(element.dimension_values(dim), dtype=float)


# ------------------------------------------------------------------------------ plots
def test_spectrum_draws_the_selected_slice_with_history(run):
    sp = run.spectral
    ov = plots.spectrum(sp, layer=1, module="v_proj", step=6, history=3)
    current = ov.values()[-1]
    np.testing.assert_array_equal(
        _values(current, "singular_values"), sp.singular_values.sel(layer=1, module="v_proj", step=6).values
    )
    faint = ov.values()[:-2]
    assert len(faint) == 3
    for curve in faint:
        step = int(curve.label.split()[-1])
        assert step < 6
        np.testing.assert_array_equal(
            _values(curve, "singular_values"), sp.singular_values.sel(layer=1, module="v_proj", step=step).values
        )
    upd = plots.spectrum(sp, layer=1, module="v_proj", update=True).values()[-1]
    np.testing.assert_array_equal(
        _values(upd, 1), sp.update_singular_values.sel(layer=1, module="v_proj").isel(step=-1).values
    )
    assert current.vdims[0].label == sp.singular_values.attrs["long_name"]


def test_trajectories_and_heatmaps_match_sel(run):
    sp = run.spectral
    traj = plots.sv_trajectories(sp, layer=2, module="q_proj")
    for k, curve in traj.items():
        np.testing.assert_array_equal(_values(curve, 1), sp.singular_values.sel(layer=2, module="q_proj", sv=k).values)
    for update in (False, True):
        name = "update_stable_rank" if update else "stable_rank"
        hm = plots.metric_heatmap(sp, "stable_rank", "v_proj", update=update)
        ref = sp[name].sel(module="v_proj").transpose("layer", "step").values
        np.testing.assert_array_equal(np.asarray(hm.dimension_values(2, flat=False), dtype=float), ref)
        assert hm.vdims[0].name == name and hm.vdims[0].label == sp[name].attrs["long_name"]
        assert [d.name for d in hm.kdims] == ["step", "layer"]


def test_nan_stays_missing(run):
    sp = run.spectral
    hm = plots.metric_heatmap(sp, "effective_rank", "k_proj")  # adapted in block 0 only
    ref = sp.effective_rank.sel(module="k_proj").transpose("layer", "step").values
    np.testing.assert_array_equal(np.asarray(hm.dimension_values(2, flat=False), dtype=float), ref)
    assert np.isnan(ref[1:]).all() and np.isfinite(ref[0]).all()
    cond = plots.metric_heatmap(sp, "condition_number", "q_proj")  # undefined at init (B = 0)
    ref = sp.condition_number.sel(module="q_proj").transpose("layer", "step").values
    assert np.isnan(ref[:, 0]).all()
    np.testing.assert_array_equal(np.asarray(cond.dimension_values(2, flat=False), dtype=float), ref)  # NaN where NaN
    spec = plots.spectrum(sp, layer=1, module="k_proj").values()[-1]
    assert np.isnan(_values(spec, 1)).all()


def test_uneven_steps_use_a_quadmesh_with_the_same_values(run):
    sp = run.spectral.isel(step=[0, 1, 2, 5, 7])
    hm = plots.metric_heatmap(sp, "effective_rank", "q_proj")
    assert type(hm).__name__ == "QuadMesh"
    ref = sp.effective_rank.sel(module="q_proj")
    for step in (0, 5, 7):
        for layer in (0, 2):
            got = hm.data["effective_rank"].sel(step=step, layer=layer).item()
            np.testing.assert_equal(got, ref.sel(step=step, layer=layer).item())


def test_gradient_plots(run):
    gr = run.gradients
    hm = plots.gradient_heatmap(gr, "B", "q_proj")
    ref = gr.grad_norm.sel(component="B", module="q_proj").transpose("layer", "step").values
    np.testing.assert_array_equal(np.asarray(hm.dimension_values(2, flat=False), dtype=float), ref)
    combined = plots.gradient_heatmap(gr, "B")  # modules combined by L2, the unadapted one (NaN) left out
    b = gr.grad_norm.sel(component="B").transpose("layer", "step", "module").values.astype(float)
    np.testing.assert_allclose(
        np.asarray(combined.dimension_values(2, flat=False), dtype=float), np.sqrt(np.nansum(b**2, axis=-1)), rtol=1e-6
    )
    ratios = plots.gradient_heatmap(gr, "B", variable="update_ratio")  # a ratio: mean over modules
    u = gr.update_ratio.sel(component="B").transpose("layer", "step", "module").values.astype(float)
    np.testing.assert_allclose(
        np.asarray(ratios.dimension_values(2, flat=False), dtype=float), np.nanmean(u, axis=-1), rtol=1e-6
    )
    ratio = plots.ab_ratio(gr, "v_proj")
    a = gr.grad_norm.sel(component="A", module="v_proj").transpose("layer", "step").values.astype(float)
    b = gr.grad_norm.sel(component="B", module="v_proj").transpose("layer", "step").values.astype(float)
    got = np.asarray(ratio.dimension_values(2, flat=False), dtype=float)
    np.testing.assert_allclose(got, a / b, rtol=1e-6)
    assert (got[:, 0] == 0).all()  # LoRA init: B = 0, so A gets no gradient at the first step
    zero_b = gr.copy(deep=True)
    zero_b["grad_norm"].loc[dict(component="B", module="v_proj", layer=1)] = 0.0
    assert np.isnan(np.asarray(plots.ab_ratio(zero_b, "v_proj").dimension_values(2, flat=False), dtype=float)[1]).all()


def test_method_specific_and_training_plots(run, dora):
    sp = dora.spectral
    sc = plots.dora_magnitude_direction(sp, layer=2, module="o_proj")
    np.testing.assert_allclose(_values(sc, "direction_norm"), sp.direction_norm.sel(layer=2, module="o_proj").values)
    np.testing.assert_allclose(_values(sc, "magnitude_norm"), sp.magnitude_norm.sel(layer=2, module="o_proj").values)
    with pytest.raises(ValueError, match="DoRA"):
        plots.dora_magnitude_direction(run.spectral, 0, "q_proj")
    budget = sp.copy()
    budget["rank_budget"] = sp.effective_rank.round()  # any (step, layer, module) field stands in for AdaLoRA's
    rb = plots.rank_budget(budget)
    np.testing.assert_allclose(_values(rb["q_proj"], 1), budget.rank_budget.sel(module="q_proj").sum("layer").values)
    tc = plots.training_curves(run.metrics, ["reward", "completions/mean_length"])
    records = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    np.testing.assert_allclose(_values(tc.values()[0], 1), rewards)
    both = plots.with_training(plots.metric_heatmap(run.spectral, "effective_rank", "q_proj"), run.metrics)
    assert len(both) == 3
    assert plots.with_training("plot", None) == "plot"


def test_plot_errors_name_what_exists(run):
    with pytest.raises(ValueError, match=r"layer 7 is not in this run; choose one of 0, 1, 2"):
        plots.spectrum(run.spectral, layer=7, module="q_proj")
    with pytest.raises(ValueError, match="no 'not_a_metric'"):
        plots.metric_heatmap(run.spectral, "not_a_metric", "q_proj")


def test_static_pngs(run, tmp_path):
    png = save_png(plots.metric_heatmap(run.spectral, "effective_rank", "q_proj"), tmp_path / "fig" / "erank.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = save_gradient_pngs(run.gradients, tmp_path / "gl")
    assert sorted(p.name for p in written) == [
        "gradient_heatmap_A.png",
        "gradient_heatmap_B.png",
        "gradient_layer_comparison.png",
    ]
    assert all(p.stat().st_size > 1000 for p in written)


def test_gradient_pngs_of_viz_are_those_training_wrote(tmp_path):
    from PIL import Image

    from perl.trackers import GradientFlowTracker

    d = synthetic_run(tmp_path / "pngs", steps=3, layers=2, modules=("q_proj",), r=2, pngs=True)
    written = save_gradient_pngs(open_run(d).gradients, tmp_path / "again")
    assert len(written) == 3
    for path in written:  # the same pixels: one function draws both
        trained = d / "gradient_logs" / path.name
        assert np.array_equal(np.asarray(Image.open(trained)), np.asarray(Image.open(path))), path.name
    # and the tracker's reading API draws the same matrix the PNG shows: modules combined by L2
    gr = open_run(d).gradients
    m = GradientFlowTracker.load(d).get_gradient_matrix("B")
    np.testing.assert_allclose(
        m.values, np.sqrt((gr.grad_norm.sel(component="B") ** 2).sum("module")).transpose("layer", "step").values
    )


def test_heatmap_view_places_uneven_steps():
    from perl.viz.views import HeatmapView, regular_grid

    steps = np.array([0, 1, 2, 5, 9, 20, 41])
    z = np.arange(2 * len(steps), dtype=float).reshape(2, -1)
    z[1, 3] = np.nan
    view = HeatmapView("t", "step", "layer")
    view.set_data(z, steps, np.array([0, 1]))
    image = view.source.data["image"][0]
    x0, dw = view.source.data["x"][0], view.source.data["dw"][0]
    centers = x0 + (np.arange(image.shape[1]) + 0.5) * dw / image.shape[1]
    for j, c in enumerate(centers):  # each pixel shows the stored step at or before it
        k = np.searchsorted(steps, c + 1e-9, side="right") - 1
        np.testing.assert_array_equal(image[:, j], z[:, k].astype(np.float32))
    assert centers[0] == pytest.approx(steps[0]) and centers[-1] >= steps[-1] - 1e-9
    assert {int(np.searchsorted(steps, c + 1e-9, side="right") - 1) for c in centers} == set(range(len(steps)))
    index, start, width = regular_grid(np.array([0, 10, 20, 30]))  # even steps: one pixel per step
    assert list(index) == [0, 1, 2, 3] and (start, width) == (-5, 40)


# ------------------------------------------------------------------------------ explorers
def test_spectral_explorer_follows_its_controls(run):
    sp = run.spectral
    ex = SpectralExplorer(run)
    assert ex.current["step"] == int(sp.step[-1]) and ex.current["layer"] == 0
    ex.select(layer=2, step=3, module="v_proj")
    ref = sp.singular_values.sel(layer=2, step=3, module="v_proj").values
    np.testing.assert_allclose(ex.spectrum.lines.data["ys"][-1], ref)
    np.testing.assert_allclose(ex.spectrum.points.data["y"], ref)
    for i, ys in enumerate(ex.trajectories.lines.data["ys"]):
        np.testing.assert_allclose(ys, sp.singular_values.sel(layer=2, module="v_proj", sv=i).values)
    hm = ex.heatmap.source.data["image"][0]
    np.testing.assert_allclose(hm, sp.effective_rank.sel(module="v_proj").transpose("layer", "step").values)
    assert (ex.heatmap.vspan.location, ex.heatmap.hspan.location) == (3.0, 2.0)
    text = ex.info.value
    assert "layer <b>2</b>" in text and "step <b>3</b>" in text and "v_proj" in text
    assert "σ = [" + ", ".join(f"{v:.4g}" for v in ref) + "]" in text
    # moving a widget (as a user does) redraws too
    ex.layer_w.value = 1
    np.testing.assert_allclose(
        ex.spectrum.lines.data["ys"][-1], sp.singular_values.sel(layer=1, step=3, module="v_proj").values
    )
    ex.select(kind=UPDATE, metric="condition_number")
    np.testing.assert_allclose(
        ex.spectrum.lines.data["ys"][-1], sp.update_singular_values.sel(layer=1, step=3, module="v_proj").values
    )
    np.testing.assert_allclose(
        ex.heatmap.source.data["image"][0],
        sp.update_condition_number.sel(module="v_proj").transpose("layer", "step").values,
    )
    assert "update_condition_number" in ex.info.value
    ex.select(module="k_proj", kind=PRODUCT)  # not adapted: drawn as missing, shown as nan
    assert np.isnan(ex.spectrum.lines.data["ys"][-1]).all()
    assert "σ = [nan, nan, nan, nan]" in ex.info.value
    with pytest.raises(ValueError, match="step 99 is not in this run"):
        ex.select(step=99)


def test_explorer_refresh_follows_a_run_still_training(tmp_path):
    d = synthetic_run(tmp_path / "live", steps=4, layers=2, modules=("q_proj",), r=2, final=False, pngs=False)
    ex = SpectralExplorer(open_run(d))
    gx = GradientExplorer(open_run(d))
    assert ex.current["step"] == 4
    ex.select(layer=1, metric="condition_number")
    gx.select(layer=1, step=2)
    synthetic_run(d, steps=7, layers=2, modules=("q_proj",), r=2, final=False, pngs=False)
    ex.refresh_button.click()
    gx.refresh()
    assert ex.current["step"] == 7 and len(ex.step_w.options) == 8
    # choices still offered are kept; a step slider not on the last step stays where it was
    assert ex.layer_w.value == 1 and ex.metric_w.value == "condition_number"
    assert gx.current["step"] == 2 and gx.layer_w.value == 1
    sp = open_run(d).spectral
    np.testing.assert_allclose(
        ex.spectrum.lines.data["ys"][-1], sp.singular_values.sel(layer=1, step=7, module="q_proj").values
    )


def test_gradient_explorer_follows_its_controls(run):
    gr = run.gradients
    gx = GradientExplorer(run)
    gx.select(component="B", module="v_proj", step=4, layer=1)
    np.testing.assert_allclose(
        gx.heatmap.source.data["image"][0],
        gr.grad_norm.sel(component="B", module="v_proj").transpose("layer", "step").values,
    )
    for c, ys in zip(gr.component.values, gx.depth.lines.data["ys"]):  # log axes: zero is drawn as missing
        np.testing.assert_allclose(ys, _log_drawn(gr.grad_norm.sel(component=c, module="v_proj", step=4).values))
        np.testing.assert_allclose(
            gx.history.lines.data["ys"][list(gr.component.values).index(c)],
            _log_drawn(gr.grad_norm.sel(component=c, module="v_proj", layer=1).values),
        )
    a = gr.grad_norm.sel(component="A", module="v_proj", layer=1).values.astype(float)
    b = gr.grad_norm.sel(component="B", module="v_proj", layer=1).values.astype(float)
    np.testing.assert_allclose(gx.ratio.lines.data["ys"][0], a / b, rtol=1e-6)
    value = gr.grad_norm.sel(component="B", module="v_proj", step=4, layer=1).item()
    assert gx.current["value"] == pytest.approx(value)
    assert f"grad_norm = {value:.4g}" in gx.info.value and "component <b>B</b>" in gx.info.value
    gx.select(variable="grad_to_weight_ratio")
    np.testing.assert_allclose(
        gx.heatmap.source.data["image"][0][np.isfinite(gx.heatmap.source.data["image"][0])],
        _positive(gr.grad_to_weight_ratio.sel(component="B", module="v_proj").transpose("layer", "step").values),
    )


def test_a_redraw_and_a_message_from_the_page_take_turns(run, monkeypatch):
    # JupyterLab hands the controls' messages and Panel's (what BokehJS sends back) to two kernel
    # threads; Panel's handler flushes the document's held changes, so one running between a redraw's
    # changes and their push lost that redraw in the browser. It must wait until the push is done.
    import threading

    import panel as pn

    gx = GradientExplorer(run)
    pane = gx.pane
    order, threads = [], []
    monkeypatch.setattr(pn.pane.Bokeh, "_on_msg", lambda self, ref, manager, msg: order.append("page message"))
    draw, push = gx._draw, gx._push

    def drawing(parts):
        message = threading.Thread(target=pane._on_msg, args=("ref", None, {}))
        message.start()
        threads.append(message)
        message.join(0.2)  # note: time for the message to run now, if nothing stops it
        order.append("changes")
        draw(parts)

    monkeypatch.setattr(gx, "_draw", drawing)
    monkeypatch.setattr(gx, "_push", lambda: (order.append("push"), push()))
    gx.select(step=int(run.gradients.step[1]))
    threads[0].join(30)
    assert order == ["changes", "push", "page message"]
    assert gx.depth.figure.title.text.endswith(f"at step {int(run.gradients.step[1])}")


def _log_drawn(a):
    a = np.asarray(a, dtype=float)
    return np.where(a > 0, a, np.nan)


def _positive(a):
    a = np.asarray(a, dtype=float)
    return a[np.isfinite(a) & (a > 0)]  # the log colour scale draws zero as missing


def test_run_comparison_side_by_side(run, dora):
    cmp = RunComparison([run, dora], metric="effective_rank", module="q_proj")
    labels = cmp.labels
    assert labels == ["lora r=4 seed=0", "dora r=4 seed=1"]
    cmp.select(layer=2, step=4)
    for lab, r, ys in zip(labels, (run, dora), cmp.over_steps.lines.data["ys"]):
        ref = r.spectral.effective_rank.sel(layer=2, module="q_proj")
        got = dict(zip(cmp.over_steps.lines.data["xs"][0], ys))
        for step, value in zip(ref.step.values, ref.values):
            np.testing.assert_allclose(got[float(step)], value)
        assert cmp.current["values"][lab] == pytest.approx(float(ref.sel(step=4)))
    cmp.select(layer=None)  # mean over layers; lora has 3 layers, dora 4
    lora_mean = run.spectral.effective_rank.sel(module="q_proj").mean("layer").values
    np.testing.assert_allclose(cmp.over_steps.lines.data["ys"][0][: len(lora_mean)], lora_mean, rtol=1e-6)
    assert np.isnan(cmp.over_depth.lines.data["ys"][0][3])  # lora has no layer 3
    assert "mean over layers" in cmp.info.value
    cmp.select(metric="grad_norm[B]")
    assert cmp.steps[0] == 1  # gradient steps start at the first optimizer step


# ------------------------------------------------------------------------------ report
def _states(page):
    """{state root: (number of stored states, keys per level)} from the page's embedded documents."""
    blocks = re.findall(r'<script type="application/json" id="[^"]+">\s*(.*?)\s*</script>', page, re.S)
    docs = json.loads(blocks[0])

    def plain(d):
        return {str(k): plain(v) for k, v in d["entries"]} if isinstance(d, dict) and d.get("type") == "map" else d

    def walk(d, level, sizes):
        if isinstance(d, dict) and "content" in d:
            return 1
        sizes.setdefault(level, set()).update(d)
        return sum(walk(v, level + 1, sizes) for v in d.values())

    out = []
    for doc in docs.values():
        for root in doc["roots"]:
            if str(root.get("name", "")).endswith("State"):
                sizes = {}
                n = walk(plain(root["attributes"]["state"]), 0, sizes)
                out.append((n, [len(sizes[k]) for k in sorted(sizes)]))
    return out


def test_report_is_self_contained_with_subsampled_frames(tmp_path):
    d = synthetic_run(tmp_path / "rep", steps=11, layers=3, modules=("q_proj", "v_proj"), r=4, pngs=True)
    path = write_report(d, tmp_path / "out" / "report.html", max_frames=5)
    page = path.read_text(encoding="utf-8")
    # HTML panes are stored escaped inside the embedded JSON: unescape to see every tag the page will create
    tags = html.unescape(html.unescape(page))
    assert not re.search(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", tags, re.I)
    assert "showing 5 of 12 stored steps" in page
    for name in ("gradient_heatmap_A.png", "gradient_heatmap_B.png", "gradient_layer_comparison.png"):
        assert re.search(rf"<img alt='{name}'[^>]*src='data:image/png;base64,", tags), name  # embedded, not linked
    states = _states(page)
    assert states, "no embedded slider states"
    for n, sizes in states:
        assert n == int(np.prod(sizes)), "every combination of a section's widgets is stored"
    # step sliders offer exactly the 5 subsampled steps; with 2 modules: 2 x 5 states
    step_sections = [(n, sizes) for n, sizes in states if 5 in sizes]
    assert step_sections and all(n == 2 * 5 for n, sizes in step_sections)
    spectral_steps = open_run(d).spectral.step.values
    kept = spectral_steps[subsample(len(spectral_steps), 5)]
    assert list(kept) == [0, 3, 6, 8, 11]
    for step in kept:
        assert f"at step {step}" in page


def test_report_cli(tmp_path, capsys):
    d = synthetic_run(tmp_path / "cli", steps=3, layers=2, modules=("q_proj",), r=2, pngs=False)
    assert report_main([str(d), "--max-steps", "3"]) == 0
    assert (d / "report.html").is_file() and "wrote" in capsys.readouterr().out
    assert report_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("perlwb report:") and "does not exist" in err and "\n" not in err
