"""The first minutes of a new user, from a shell: `perlwb` (never the Perl interpreter's name), a
readable console while training, a run folder whose README.md explains it, and every command
printed at the end runs as printed from the project folder in a fresh shell (no activated venv).

One short real training (`perlwb train`, 2 steps, both trackers) is shared by the tests here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
PERLWB = Path(sys.executable).parent / "perlwb"
# a fresh login shell: the system PATH only, no VIRTUAL_ENV, nothing of this process's environment
FRESH_ENV = {
    "PATH": os.defpath,
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
TRAIN_FLAGS = [
    "--enable_tracking",
    "--tracking_frequency",
    "1",
    "--config.training.max_steps",
    str(STEPS),
    "--config.training.per_device_train_batch_size",
    "8",
    "--config.dataset.example_numbers",
    "16",
    "--config.dataset.test_size",
    "4",
]


def fresh_shell(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``command`` typed into bash in the project folder, with a fresh shell's environment."""
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", command],
        cwd=ROOT,
        env=FRESH_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A real `perlwb train` from the project folder: (its output folder, the finished process)."""
    out = tmp_path_factory.mktemp("front_door") / "run"
    assert PERLWB.is_file(), f"no console script {PERLWB}: reinstall the package (make setup)"
    proc = fresh_shell(shlex.join([str(PERLWB), *TRAIN_FLAGS, "--config.training.output_dir", str(out)]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def printed_commands(stdout: str) -> list[str]:
    """The commands under "next (...)" at the end of the training output (indented by four spaces)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("next ("))
    return [line.strip() for line in lines[start + 1 :] if line.startswith("    ")]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_console_script_is_perlwb_and_python_m_perl_is_the_same_command():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("[")[0]
    assert re.search(r"^perlwb = \"perl.cli:main\"$", scripts, re.M) and not re.search(r"^perl =", scripts, re.M)
    via_script = subprocess.run([str(PERLWB), "--help"], capture_output=True, text=True, cwd=ROOT)
    via_module = subprocess.run([sys.executable, "-m", "perl", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert via_script.returncode == via_module.returncode == 0
    assert via_script.stdout == via_module.stdout and via_script.stdout.startswith("usage: perlwb ")


def test_every_printed_command_runs_as_printed_in_a_fresh_shell(cli_run):
    out, proc = cli_run
    commands = printed_commands(proc.stdout)
    tools = {shlex.split(c)[0] for c in commands}
    assert len(commands) == 4 and all(t.startswith(".venv/bin/") or "/" in t for t in tools), commands
    for command in commands:
        words = shlex.split(command)
        if words[1:2] == ["report"]:
            done = fresh_shell(command)  # as printed: writes the report
            assert done.returncode == 0 and (out / "report.html").stat().st_size > 100_000, done.stderr[-2000:]
        elif words[1:2] == ["eval"]:
            done = fresh_shell(command + " --n 4 --no-progress")  # as printed, on 4 problems instead of 200
            assert done.returncode == 0 and "adapter" in done.stdout, done.stderr[-2000:]
            assert "is_gradient_checkpointing" not in done.stderr
        elif words[0].endswith("papermill"):
            done = fresh_shell(command + " --prepare-only")  # as printed, parameters injected, not executed
            assert done.returncode == 0, done.stderr[-2000:]
            written = json.loads((ROOT / words[2]).read_text())  # note: ROOT / an absolute path is that path
            injected = [c for c in written["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
            assert len(injected) == 1 and str(out) in "".join(injected[0]["source"])
        elif words[0].endswith("jupyter"):
            done = fresh_shell(command + " --help")  # the server itself would not return
            assert done.returncode == 0 and "JupyterLab" in done.stdout, done.stderr[-2000:]
            assert (ROOT / words[2]).is_dir()
        else:
            pytest.fail(f"a printed command this test does not know how to run: {command}")


def test_the_console_is_a_progress_bar_and_short_lines(cli_run):
    out, proc = cli_run
    console = proc.stdout + proc.stderr
    assert "{'loss'" not in console, "the Trainer's full log dict reached the console"
    assert "is_gradient_checkpointing" not in console, "the known transformers deprecation notice was not filtered"
    assert re.search(rf"training: 100%.*{STEPS}/{STEPS}", console.replace("\r", "\n"))
    (line,) = [t for t in console.replace("\r", "\n").splitlines() if t.startswith(f"step {STEPS}/{STEPS} | ")]
    logged = [m for m in metrics(out) if "reward" in m]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    # the rewards of the short line are the means over the steps since the last line (all of them here)
    shown = dict(re.findall(r"(reward|correct eq|format) (-?\d+\.\d+)", line))
    for label, key in (
        ("reward", "reward"),
        ("correct eq", "rewards/equation_reward/mean"),
        ("format", "rewards/format_reward/mean"),
    ):
        assert float(shown[label]) == pytest.approx(sum(m[key] for m in logged) / len(logged), abs=5.1e-4), (
            label
        )  # printed to 3 decimals


def test_debug_brings_the_trainers_full_logs_back(tmp_path):
    proc = fresh_shell(
        shlex.join(
            [
                str(PERLWB),
                "--config.training.max_steps",
                "1",
                "--config.common.debug",
                "true",
                "--config.training.per_device_train_batch_size",
                "8",
                "--config.dataset.example_numbers",
                "16",
                "--config.dataset.test_size",
                "4",
                "--config.training.output_dir",
                str(tmp_path / "run"),
            ]
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert "{'loss'" in console and "'reward'" in console
    assert not re.search(r"^step 1/1 \| ", console.replace("\r", "\n"), re.M)


def test_the_run_folder_readme_is_a_run_card(cli_run):
    out, _ = cli_run
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card, "peft's empty model-card template is still there"
    assert "countdown_nano" not in card, "the card names the embedded model's absolute path"
    config = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert f"| method | `{config['peft']['type']}` |" in card
    assert f"| model | `{config['model']['model_name_or_path']}` |" in card
    assert f"| rank r / alpha | {config['peft']['r']} / {config['peft']['lora_alpha']} |" in card
    assert f"| optimizer steps | {STEPS} " in card
    logged = [m for m in metrics(out) if "reward" in m]
    first, last = logged[0]["reward"], logged[-1]["reward"]
    assert f"| reward | {first:.3f} → {last:.3f} " in card  # one logged step per side for a 2-step run
    listed = re.findall(r"^\| `([^`]+)` \|", card, re.M)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "adapter_model.safetensors",
        "spectral_history_final.nc",
        "gradient_flow_final.nc",
        "gradient_logs/gradient_heatmap_B.png",
    ):
        assert name in listed and (out / name).is_file(), name
    assert all((out / name).is_file() for name in listed), "the card lists a file the run does not have"
    # the card's commands are the ones printed at the end of training
    block = card.split("```bash\n")[1].split("```")[0]
    assert [c for c in block.splitlines() if not c.startswith("#")] == printed_commands(cli_run[1].stdout)


def test_only_the_known_notice_is_hidden_by_message_category_and_module():
    import warnings

    from perl.progress import quiet_known_warnings

    def warn_from(module: str, message: str, category=FutureWarning):
        # a warning as module `module` raises it (the filter matches the warning's module)
        exec(
            compile("import warnings\nwarnings.warn(m, c)", f"<{module}>", "exec"),
            {"__name__": module, "m": message, "c": category},
        )

    known = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_known_warnings():
            warn_from("transformers.modeling_utils", known)
            warn_from("transformers.modeling_utils", "something else is deprecated")
            warn_from("my_module", known)
            warn_from("transformers.modeling_utils", known, category=UserWarning)
        warn_from("transformers.modeling_utils", known)  # outside the block: shown again
    shown = [(str(w.message), w.category) for w in caught]
    assert shown == [
        ("something else is deprecated", FutureWarning),
        (known, FutureWarning),
        (known, UserWarning),
        (known, FutureWarning),
    ]
