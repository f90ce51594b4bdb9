"""Every notebook in notebooks/ (six) runs top to bottom under papermill on real runs and shows what it promises.

Here: notebook 01 trains (a 3-step DoRA run on the embedded model, or on "tiny-random" while the
embedded model is not built); 02 and 03 read the session's shared LoRA run (``tracked_run`` in
conftest.py); 04 compares those two real runs, named through a sweep folder. What a user sees is
checked against the run's files read here directly (netCDF, JSON lines, YAML): the explorers'
text lines (kept in the executed notebook's widget state) and the printed tables. Notebook 05 is
executed on a sweep with a known answer in tests/test_sweep.py (which also checks its committed
form), 06 on a two-seed sweep in tests/test_sweep_summary.py; the committed form of the others
is checked here.

The small helpers the notebooks share (`perl.notebook_utils`) are tested at the end.
"""

from __future__ import annotations

import ast
import html
import json
import math
import re
import types
from pathlib import Path

import nbformat
import numpy as np
import pytest
import xarray as xr
import yaml

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PARAMETERS = {
    "01_train_and_track": {
        "output_dir",
        "peft_type",
        "model_name_or_path",
        "max_steps",
        "tracking_frequency",
        "overrides",
    },
    "02_spectral_explorer": {"run_dir"},
    "03_gradient_explorer": {"run_dir"},
    "04_compare_runs": {"run_dirs"},
    "06_perl_questions": {"sweep_dir"},  # executed on a two-seed sweep in tests/test_sweep_summary.py
}
KERNEL = "python3"
NOTEBOOK01_STEPS = 3


def execute(name: str, folder: Path, **parameters) -> nbformat.NotebookNode:
    """Run notebooks/<name>.ipynb with papermill in ``folder``; a cell that raises fails the test."""
    import papermill

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.out.ipynb"
    with pytest.MonkeyPatch.context() as mp:
        # note: the kernel inherits this; tiny models gain nothing from a second thread, and on a
        # shared CPU two spinning OpenMP threads per kernel cost several times the work
        mp.setenv("OMP_NUM_THREADS", "1")
        papermill.execute_notebook(
            str(NOTEBOOKS / f"{name}.ipynb"),
            str(out),
            parameters=parameters,
            kernel_name=KERNEL,
            cwd=str(folder),
            progress_bar=False,
        )
    return nbformat.read(out, as_version=4)


def widget_texts(nb, css_class: str) -> list[str]:
    """Text of the HTML widgets (explorer info lines, the live reward line) with this CSS class,
    from the widget state the executed notebook keeps (what the browser would show)."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    texts = []
    for model in state.values():
        value = model.get("state", {}).get("value")
        if isinstance(value, str) and f"class='{css_class}'" in value:
            texts.append(html.unescape(re.sub(r"<[^>]+>", "", value)))
    return texts


def outputs_text(nb, mime: str = "text/plain") -> list[str]:
    """Every text output of every code cell, stream or ``mime``, in cell order."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                found.append(out.text)
            elif mime in out.get("data", {}):
                found.append(out.data[mime])
    return found


def numbers(text: str) -> np.ndarray:
    return np.array([float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan", text, flags=re.IGNORECASE)])


def read_nc(path: Path) -> xr.Dataset:
    with xr.open_dataset(path, engine="netcdf4") as ds:
        return ds.load()


def reward_by_step(run_dir: Path) -> dict[int, float]:
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "reward" in record:
            by_step[int(record["step"])] = float(record["reward"])
    return by_step


# ------------------------------------------------------------------------------ committed form
@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_is_committed_clean_with_a_question_and_parameters(name):
    from jupyter_client.kernelspec import KernelSpecManager

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "?" in first.source, "the notebook opens with the question it answers"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "committed without outputs"
    assert "widgets" not in nb.metadata
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters` (papermill -p)"
    assigned = {t.id for node in ast.parse(tagged[0].source).body for t in node.targets}
    assert assigned == PARAMETERS[name]
    assert nb.metadata.kernelspec.name == KERNEL
    assert KernelSpecManager().get_kernel_spec(KERNEL) is not None
    for cell in code:
        ast.parse(cell.source)  # every cell is valid Python
    if name == "01_train_and_track":
        defaults = {
            t.id: ast.literal_eval(node.value) for node in ast.parse(tagged[0].source).body for t in node.targets
        }
        assert defaults["model_name_or_path"] == "countdown-nano"


# ------------------------------------------------------------------------------ executed
@pytest.fixture(scope="session")
def notebook01(tmp_path_factory):
    """Notebook 01 executed: trains a short DoRA run into a temp folder. Returns (notebook, run dir)."""
    folder = tmp_path_factory.mktemp("nb01")
    run_dir = folder / "dora-run"
    nb = execute(
        "01_train_and_track",
        folder,
        output_dir=str(run_dir),
        peft_type="dora",
        model_name_or_path="countdown-nano",
        max_steps=NOTEBOOK01_STEPS,
        tracking_frequency=1,
    )
    return nb, run_dir


def test_01_trains_shows_live_reward_and_opens_both_explorers(notebook01):
    nb, run_dir = notebook01
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["peft"]["type"] == "dora" and config["training"]["max_steps"] == NOTEBOOK01_STEPS
    assert config["tracker"]["enable_spectral_tracking"] and config["tracker"]["enable_gradient_tracking"]

    # our progress bar (a tqdm widget) reached the end, and the cell says where the run is
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    bars = [m["state"] for m in state.values() if m.get("model_name") in ("FloatProgressModel", "IntProgressModel")]
    assert any(b.get("value") == NOTEBOOK01_STEPS and b.get("max") == NOTEBOOK01_STEPS for b in bars), bars
    assert f"trained {NOTEBOOK01_STEPS} steps; the run is in {run_dir}" in "".join(outputs_text(nb))
    # no third-party deprecation noise and no Trainer step/loss table under the plot
    everything = "\n".join(outputs_text(nb) + outputs_text(nb, "text/html"))
    assert "is_gradient_checkpointing" not in everything and "Training Loss" not in everything

    # the live reward line ends on the last step with the reward metrics.jsonl holds for it
    (live,) = widget_texts(nb, "perl-live")
    rewards = reward_by_step(run_dir)
    last = max(rewards)
    assert last == NOTEBOOK01_STEPS
    assert live.startswith(f"finished: step {last} of {NOTEBOOK01_STEPS} | reward ")
    shown = float(re.search(r"\| reward (\S+)", live).group(1))
    assert shown == pytest.approx(rewards[last], abs=5e-4)

    # both explorers were opened on the run and show its last stored step
    spectral = read_nc(run_dir / "spectral_history_final.nc")
    gradients = read_nc(run_dir / "gradient_flow_final.nc")
    info = widget_texts(nb, "perl-info")
    assert len(info) == 2
    spectral_line = next(t for t in info if "σ =" in t)
    gradient_line = next(t for t in info if "component" in t)
    assert spectral_line.startswith(
        f"layer {int(spectral.layer[0])} | module {spectral.module.values[0]!s} | step {int(spectral.step[-1])} |"
    )
    assert gradient_line.startswith(f"step {int(gradients.step[-1])} |")
    assert "component magnitude" not in gradient_line and "magnitude:" in gradient_line  # DoRA's own component


def test_02_spectral_explorer(tracked_run, tmp_path):
    nb = execute("02_spectral_explorer", tmp_path, run_dir=str(tracked_run))
    sp = read_nc(tracked_run / "spectral_history_final.nc")
    last = int(sp.step[-1])
    (line,) = widget_texts(nb, "perl-info")
    layer, module = int(sp.layer[0]), str(sp.module.values[0])
    assert line.startswith(f"layer {layer} | module {module} | step {last} | product |")
    sigma = numbers(re.search(r"σ = \[([^\]]*)\]", line).group(1))
    np.testing.assert_allclose(
        sigma, sp.singular_values.sel(layer=layer, module=module, step=last).values, rtol=1e-3, atol=1e-12
    )

    # the "which layers and modules move most" ranking: the ten largest update norms at the last step
    texts = outputs_text(nb)
    ranking = next(t for t in texts if re.search(r"\ndtype: float\d+$", t))
    norms = sp.update_frobenius_norm.sel(step=last).values.ravel()
    expected = np.sort(norms[np.isfinite(norms)])[::-1][:10]  # not adapted (NaN) is left out
    shown = numbers(" ".join(row.split()[-1] for row in ranking.splitlines()[1:-1]))
    np.testing.assert_allclose(shown, expected, rtol=1e-3, atol=1e-6)  # as pandas prints them


def test_03_gradient_explorer(tracked_run, tmp_path):
    nb = execute("03_gradient_explorer", tmp_path, run_dir=str(tracked_run))
    gr = read_nc(tracked_run / "gradient_flow_final.nc")
    last = int(gr.step[-1])
    (line,) = widget_texts(nb, "perl-info")
    layer, module = int(gr.layer[0]), str(gr.module.values[0])
    assert line.startswith(f"step {last} | layer {layer} | module {module} | component A | grad_norm = ")
    value = numbers(re.search(r"grad_norm = (\S+)", line).group(1))[0]
    assert value == pytest.approx(
        float(gr.grad_norm.sel(step=last, layer=layer, module=module, component="A")), rel=1e-3, abs=1e-12
    )

    # the depth profile: one row per layer, one column per component, the mean over steps and modules
    texts = outputs_text(nb)
    profile = next(t for t in texts if t.startswith("component"))
    rows = profile.splitlines()[2:]
    assert [int(r.split()[0]) for r in rows] == [int(v) for v in gr.layer.values]
    expected = np.nanmean(gr.grad_norm.transpose("layer", "step", "module", "component").values, axis=(1, 2))
    np.testing.assert_allclose(np.array([numbers(r)[1:] for r in rows]), expected, rtol=1e-3, atol=1e-6)  # as printed


def test_04_compares_the_runs_of_a_sweep_folder(tracked_run, notebook01, tmp_path):
    _, dora_run = notebook01
    sweep = tmp_path / "sweep"
    (sweep / "lora").mkdir(parents=True)
    # note: a sweep folder as a sweep leaves it, runs one level down; links to the two real runs
    (sweep / "lora" / "seed42").symlink_to(tracked_run, target_is_directory=True)
    (sweep / "dora").symlink_to(dora_run, target_is_directory=True)
    nb = execute("04_compare_runs", tmp_path / "exec", run_dirs=str(sweep))

    (line,) = widget_texts(nb, "perl-info")
    assert "dora r=8 seed=42 = " in line and "lora r=8 seed=42 = " in line
    texts = outputs_text(nb)
    assert "<Runs: 2 runs: dora r=8 seed=42, lora r=8 seed=42>" in texts  # sorted by folder name

    # the summary row of each run: its method and its final reward from metrics.jsonl
    summary = next(t for t in texts if t.lstrip().startswith("method"))
    for label, run_dir in (("dora r=8 seed=42", dora_run), ("lora r=8 seed=42", tracked_run)):
        row = next(r for r in summary.splitlines() if r.startswith(label))
        method, r, seed, steps, final_reward = row[len(label) :].split()[:5]
        rewards = reward_by_step(run_dir)
        assert (method, int(r), int(seed), int(steps)) == (label.split()[0], 8, 42, max(rewards))
        tail = [rewards[s] for s in sorted(rewards)][-10:]
        assert float(final_reward) == pytest.approx(sum(tail) / len(tail), abs=1e-3)


# ------------------------------------------------------------------------------ notebook_utils
def _touch_run(folder: Path, marker: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).write_text("{}\n" if marker.endswith(".yaml") else "")
    return folder


def test_find_run_dirs_globs_sweeps_and_lists(tmp_path):
    from perl.notebook_utils import find_run_dirs
    from perl.run import RunError

    a = _touch_run(tmp_path / "sweep" / "a")
    b = _touch_run(tmp_path / "sweep" / "group" / "b", "metrics.jsonl")
    _touch_run(b / "checkpoint-1")  # inside a run: not a run of its own
    (tmp_path / "sweep" / "notes").mkdir()
    (tmp_path / "sweep" / "README").write_text("not a run")

    assert find_run_dirs(tmp_path / "sweep") == [a, b]
    assert find_run_dirs(str(tmp_path / "sweep" / "*")) == [a, b]
    assert find_run_dirs([b, a, b]) == [b, a]
    assert find_run_dirs(str(a)) == [a]
    with pytest.raises(RunError, match="does not exist"):
        find_run_dirs(tmp_path / "nowhere")
    with pytest.raises(RunError, match="No run folders found"):
        find_run_dirs(tmp_path / "sweep" / "notes")
    with pytest.raises(RunError, match="No run folders given"):
        find_run_dirs([])


def test_run_summary_against_the_files(tmp_path):
    from perl.notebook_utils import run_summary
    from perl.run import open_runs
    from perl.synthetic import synthetic_run

    lora = synthetic_run(tmp_path / "lora", steps=12, layers=2, modules=("q_proj", "v_proj"), r=4, seed=3, pngs=False)
    dora = synthetic_run(
        tmp_path / "dora", steps=5, layers=2, modules=("q_proj",), r=4, seed=1, method="dora", pngs=False
    )
    # known rewards, so the expected numbers are arithmetic, not the code under test
    (lora / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in range(1, 13))
    )
    (dora / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "reward": 0.5}) + "\n" + json.dumps({"step": 2, "loss": 1.0}) + "\n"
    )

    table = run_summary(open_runs([lora, dora]), last=10)
    assert list(table.index) == ["lora r=4 seed=3", "dora r=4 seed=1"]
    assert table.loc["lora r=4 seed=3", "final_reward"] == pytest.approx(np.mean(np.arange(3, 13) / 10))
    assert table.loc["lora r=4 seed=3", "best_reward"] == pytest.approx(1.2)
    assert table.loc["dora r=4 seed=1", "final_reward"] == pytest.approx(0.5)  # step 2 logged no reward: NaN, skipped
    assert table.loc["dora r=4 seed=1", "steps"] == 2
    for run_dir, label in ((lora, "lora r=4 seed=3"), (dora, "dora r=4 seed=1")):
        sp = read_nc(run_dir / "spectral_history_final.nc")
        for name in ("effective_rank", "update_frobenius_norm"):
            assert table.loc[label, f"{name}_mean"] == pytest.approx(np.nanmean(sp[name].values[-1]))


def test_live_reward_plot_records_what_the_trainer_logs():
    from transformers import TrainerState, TrainingArguments

    from perl.notebook_utils import LiveRewardPlot

    live = LiveRewardPlot(display=False)
    args, state = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(max_steps=4)
    live.on_train_begin(args, state, None)
    for step, logs in (
        (1, {"loss": 0.1, "reward": 0.25, "rewards/format_reward/mean": 0.5}),
        (2, {"reward": 0.75, "rewards/format_reward/mean": 1.0, "rewards/equation_reward/mean": 0.5}),
        (2, {"train_runtime": 3.0}),
    ):  # the final summary log: nothing to draw
        state.global_step = step
        live.on_log(args, state, None, logs=logs)
    assert live.history["step"] == [1, 2]
    assert live.history["reward"] == [0.25, 0.75]
    assert live.history["rewards/format_reward/mean"] == [0.5, 1.0]
    assert math.isnan(live.history["rewards/equation_reward/mean"][0])  # first logged at step 2
    assert live.text == "step 2 of 4 | reward 0.750 | format_reward 1.000 | equation_reward 0.500"
    live.on_train_end(args, state, None)
    assert live.text.startswith("finished: step 2 of 4 |")
    live.on_step_end(args, state, None)  # events it does not use are accepted and ignored

    other = LiveRewardPlot(display=False)
    state.is_world_process_zero = False  # only the main process draws
    other.on_log(args, state, None, logs={"reward": 1.0})
    assert other.history == {"step": []}


def test_live_reward_plot_waits_for_the_page_to_have_bokehjs(monkeypatch):
    # the plot widget's view fails for good if built before Panel's loader has put BokehJS in the
    # page: the plot joins the text line PLOT_DELAY_S after it is shown, or when training ends
    from transformers import TrainerState, TrainingArguments

    import perl.notebook_utils as nu

    clock = [100.0]
    monkeypatch.setattr(nu, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: None)
    args, state = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(max_steps=4)
    live, short = nu.LiveRewardPlot(), nu.LiveRewardPlot()
    for plot in (live, short):
        plot.on_train_begin(args, state, None)
        state.global_step = 1
        plot.on_log(args, state, None, logs={"reward": 0.5})
        assert plot._box.children == (plot.info,), "the plot is shown before the page can draw it"
    clock[0] += nu.PLOT_DELAY_S
    state.global_step = 2
    live.on_log(args, state, None, logs={"reward": 0.75})
    assert live._box.children == (live.info, live._pane) and live._pane is not None
    short.on_train_end(args, state, None)  # a run shorter than the delay gets its plot at the end
    assert short._box.children == (short.info, short._pane) and short._pane is not None


def test_02_on_a_vector_adapter_shows_norms_instead_of_spectra(tmp_path):
    """IA3 adapts vectors: no spectra, so 02 shows their norms and distance from init, and does not fail."""
    from perl.testing import distinct_characters_reward, tiny_train_config
    from perl.train import train

    run = tmp_path / "ia3-run"
    train(tiny_train_config(run, max_steps=2, method="ia3"), reward_funcs=[distinct_characters_reward])
    nb = execute("02_spectral_explorer", tmp_path, run_dir=str(run))
    sp = read_nc(run / "spectral_history_final.nc")
    assert "singular_values" not in sp
    texts = outputs_text(nb)
    ranking = next(t for t in texts if re.search(r"\ndtype: float\d+$", t))
    moved = sp.vector_distance_from_init.sel(step=int(sp.step[-1])).values.ravel()
    expected = np.sort(moved[np.isfinite(moved)])[::-1][:10]
    shown = numbers(" ".join(row.split()[-1] for row in ranking.splitlines()[1:-1]))
    np.testing.assert_allclose(shown, expected, rtol=1e-3, atol=1e-6)
