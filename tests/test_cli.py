"""The `perlwb` command line: every bad input ends with exit code 2, one stderr line, nothing written.

The bad-input tests run `python run.py ...` as a user would (a subprocess in a temporary folder).
The parse-level tests call `main([...])` with `perl.train` replaced by a module whose `train`
only records the config it is given: they test the command line, not training.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from perl import cli
from perl.config import PEFT_TYPES, SECTIONS, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "run.py"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def _model_dir(tmp_path: Path) -> Path:
    # a folder that `resolve_model_path` accepts (it reads no weights), so the model check passes
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return model


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(RUN_PY), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("perlwb: error: ")
    for needle in needles:
        assert needle in line, (needle, line)
    return line


YAML_FILES = {
    "malformed.yaml": "peft:\n  type: lora\n   r: 8\n",
    "unknown_key.yaml": "peft:\n  lora_aplha: 32\n",
    "negative.yaml": "tracker:\n  spectral_log_frequency: -10\n",
}

# (flags, words the one stderr line must contain); every case also gets --config.training.output_dir out
BAD_INPUTS = {
    "unknown peft type": (["--config.peft.type", "lorra"], ["peft.type", *PEFT_TYPES, "did you mean 'lora'"]),
    "unknown config key": (["--config.peft.rank", "16"], ["unknown config key 'peft.rank'", "did you mean 'peft.r'"]),
    "unknown section": (["--config.trainng.max_steps", "3"], ["unknown config section 'trainng'", "'training'"]),
    "unknown key in yaml": (["--config", "unknown_key.yaml"], ["peft.lora_aplha", "did you mean 'peft.lora_alpha'"]),
    "unknown flag": (["--enable_trackng"], ["--enable_trackng", "did you mean --enable_tracking"]),
    "wrong type int": (["--config.peft.r", "eight"], ["peft.r", "integer", "'eight'"]),
    "wrong type float": (["--config.training.learning_rate", "1e-4x"], ["learning_rate", "number"]),
    "wrong type bool": (["--config.tracker.compute_full_svd", "maybe"], ["compute_full_svd", "true or false"]),
    "missing value": (["--config.peft.r"], ["--config.peft.r", "expects a value"]),
    "negative tracking_frequency": (
        ["--enable_tracking", "--tracking_frequency", "-5"],
        ["--tracking_frequency", "-5"],
    ),
    "zero tracking_frequency": (["--tracking_frequency", "0"], ["--tracking_frequency", "positive"]),
    "negative frequency flag": (["--config.tracker.gradient_log_frequency", "-1"], ["gradient_log_frequency", ">= 1"]),
    "negative frequency yaml": (["--config", "negative.yaml"], ["spectral_log_frequency", ">= 1", "-10"]),
    "malformed yaml": (["--config", "malformed.yaml"], ["malformed YAML", "malformed.yaml", "line 3"]),
    "missing config file": (["--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
    "model path not there": (["--config.model.model_name_or_path", "/no/such/model"], ["/no/such/model"]),
    "hub id not there": (["--config.model.model_name_or_path", "nobody/no-such-model"], ["nobody/no-such-model"]),
    "dataset not there": (
        ["--config.model.model_name_or_path", "model", "--config.dataset.dataset_name_or_path", "/no/such/data.jsonl"],
        ["/no/such/data.jsonl"],
    ),
    "unknown command": (["trian"], ["unknown command 'trian'", "did you mean 'train'"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    for name, text in YAML_FILES.items():
        (tmp_path / name).write_text(text)
    _model_dir(tmp_path)
    before = _snapshot(tmp_path)
    flags, words = BAD_INPUTS[case]
    proc = run_cli(tmp_path, *flags, "--config.training.output_dir", "out")
    assert_user_error(proc, *words)
    assert not (tmp_path / "out").exists()
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "marker", ["config.yaml", "checkpoint-10/", "spectral_history_final.nc", "spectral_logs/spectral_history.nc"]
)
def test_output_dir_with_an_earlier_run_is_refused(tmp_path, marker):
    out = tmp_path / "out"
    target = out / marker.rstrip("/")
    if marker.endswith("/"):
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("earlier run")
    _model_dir(tmp_path)
    before = _snapshot(tmp_path)
    proc = run_cli(tmp_path, "--config.model.model_name_or_path", "model", "--config.training.output_dir", "out")
    assert_user_error(proc, "already holds a run", "--overwrite_output_dir", "resume_from_checkpoint")
    assert _snapshot(tmp_path) == before


def test_tracking_output_dir_with_an_earlier_run_is_refused(tmp_path):
    (tmp_path / "tracks" / "gradient_logs").mkdir(parents=True)
    (tmp_path / "tracks" / "gradient_logs" / "gradient_flow.nc").write_text("x")
    _model_dir(tmp_path)
    before = _snapshot(tmp_path)
    proc = run_cli(
        tmp_path,
        "--config.model.model_name_or_path",
        "model",
        "--enable_tracking",
        "--tracking_output_dir",
        "tracks",
        "--config.training.output_dir",
        "out",
    )
    assert_user_error(proc, "tracks", "already holds a run")
    assert _snapshot(tmp_path) == before


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("{}")
    _model_dir(tmp_path)
    before = _snapshot(tmp_path)
    proc = run_cli(
        tmp_path,
        "--config.model.model_name_or_path",
        "model",
        "--config.training.output_dir",
        "out",
        "--config.training.resume_from_checkpoint",
        "true",
    )
    assert_user_error(proc, "no checkpoint-* folder")
    assert _snapshot(tmp_path) == before


def test_help_lists_every_flag_with_its_help_text(tmp_path):
    proc = run_cli(tmp_path, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    text = " ".join(proc.stdout.split())  # argparse wraps long help lines
    for flag, words in {
        "--enable_tracking": "Enable both spectral and gradient tracking",
        "--enable_spectral_tracking": "Enable only spectral tracking",
        "--enable_gradient_tracking": "Enable only gradient tracking",
        "--tracking_frequency N": "Log every N steps",
        "--tracking_output_dir DIR": "Custom output directory for tracking data",
        "--overwrite_output_dir": "already holds a run",
        "--enable_alignment_tracking": "alignment",
        "--config PATH": "YAML",
    }.items():
        assert flag in text and words in text, flag
    for section, section_cls in SECTIONS.items():
        for f in dataclasses.fields(section_cls):
            assert f"--config.{section}.{f.name} " in text
            assert " ".join(f.metadata["help"].split()) in text, f.name
    for command in ("train", "eval", "build-model", "report", "sweep"):
        assert f"perlwb {command}" in text


# ------------------------------------------------------------------------------ parse level


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """Replace `perl.train` with a module whose `train` records the config; return the records."""
    calls: list[TrainConfig] = []

    def train(config):
        calls.append(config)
        return types.SimpleNamespace(output_dir=Path(config.training.output_dir))

    fake = types.ModuleType("perl.train")
    fake.train = train
    monkeypatch.setitem(sys.modules, "perl.train", fake)
    monkeypatch.chdir(tmp_path)
    _model_dir(tmp_path)
    return calls


def _main(*args: str) -> int:
    return cli.main([*args, "--config.model.model_name_or_path", "model"])


def test_defaults_reach_train(captured, capsys):
    assert _main("--config.training.output_dir", "out") == 0
    (cfg,) = captured
    expected = TrainConfig()
    expected.training.output_dir = "out"
    expected.model.model_name_or_path = "model"
    assert cfg == expected
    out = capsys.readouterr().out
    assert "the run is in out/" in out
    assert "papermill" not in out, "a run without tracking stores gets no explorer command that would fail on it"


def test_train_subcommand_is_the_same_as_the_default(captured):
    assert _main("train", "--config.peft.r", "4") == 0
    assert _main("--config.peft.r", "4") == 0
    assert captured[0] == captured[1] and captured[0].peft.r == 4


def test_enable_tracking_sets_both_and_frequency_sets_both(captured):
    assert _main("--enable_tracking", "--tracking_frequency", "7", "--tracking_output_dir", "tr") == 0
    t = captured[0].tracker
    assert t.enable_spectral_tracking and t.enable_gradient_tracking
    assert (t.spectral_log_frequency, t.gradient_log_frequency) == (7, 7)
    assert t.tracking_output_dir == "tr"
    assert not t.enable_alignment_tracking


@pytest.mark.parametrize(
    "flag, spectral, gradient",
    [("--enable_spectral_tracking", True, False), ("--enable_gradient_tracking", False, True)],
)
def test_enable_one_tracker(captured, flag, spectral, gradient):
    assert _main(flag) == 0
    t = captured[0].tracker
    assert (t.enable_spectral_tracking, t.enable_gradient_tracking) == (spectral, gradient)
    assert t.spectral_log_frequency == t.gradient_log_frequency == 100


def test_alignment_and_overwrite_flags(captured):
    assert _main("--enable_alignment_tracking", "--overwrite_output_dir") == 0
    assert captured[0].tracker.enable_alignment_tracking and captured[0].training.overwrite_output_dir


def test_tracking_docs_standard_flags(captured):
    assert (
        _main(
            "--config.tracker.enable_spectral_tracking",
            "true",
            "--config.tracker.enable_gradient_tracking",
            "true",
            "--config.tracker.spectral_log_frequency",
            "100",
            "--config.tracker.gradient_log_frequency",
            "50",
            "--config.peft.type",
            "dora",
        )
        == 0
    )
    t = captured[0].tracker
    assert t.enable_spectral_tracking and t.enable_gradient_tracking
    assert (t.spectral_log_frequency, t.gradient_log_frequency) == (100, 50)
    assert captured[0].peft.type == "dora"


def test_precedence_defaults_yaml_convenience_dotted(captured, tmp_path):
    (tmp_path / "c.yaml").write_text(
        "peft: {r: 4, lora_alpha: 8}\ntracker: {spectral_log_frequency: 3, gradient_log_frequency: 3}\n"
    )
    assert (
        _main(
            "--config",
            "c.yaml",
            "--config.peft.r",
            "16",
            "--tracking_frequency",
            "9",
            "--config.tracker.spectral_log_frequency",
            "2",
        )
        == 0
    )
    cfg = captured[0]
    assert (cfg.peft.r, cfg.peft.lora_alpha) == (16, 8)  # dotted beats YAML; YAML beats the default
    assert (cfg.tracker.spectral_log_frequency, cfg.tracker.gradient_log_frequency) == (2, 9)


def test_typed_flag_values(captured):
    assert (
        _main(
            "--config.common.debug",  # a bare boolean flag means true
            "--config.tracker.compute_full_svd",
            "false",
            "--config.peft.target_modules",
            "q_proj,v_proj",
            "--config.training.lr_scheduler_kwargs",
            "{min_lr: 1e-6}",
            "--config.training.epsilon_high",
            "none",
            "--config.training.max_steps",
            "-1",
            "--config.training.learning_rate=2e-5",
        )
        == 0
    )
    cfg = captured[0]
    assert cfg.common.debug is True and cfg.tracker.compute_full_svd is False
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.lr_scheduler_kwargs == {"min_lr": 1e-6}
    assert cfg.training.epsilon_high is None and cfg.training.max_steps == -1
    assert cfg.training.learning_rate == 2e-5


def test_saved_config_reproduces_the_run(captured, tmp_path):
    from perl.config import save_config

    assert _main("--config.peft.type", "vera", "--enable_tracking", "--config.training.output_dir", "a") == 0
    save_config(captured[0], tmp_path / "a" / "config.yaml")  # what train() writes first
    assert _main("--config", "a/config.yaml", "--config.training.output_dir", "b") == 0
    first, second = captured
    assert load_config(tmp_path / "a" / "config.yaml") == first
    second.training.output_dir = first.training.output_dir
    assert second == first


def test_overwrite_and_resume_allow_an_earlier_run(captured, tmp_path):
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "out" / "config.yaml").write_text("{}")
    assert _main("--config.training.output_dir", "out") == 2
    assert _main("--config.training.output_dir", "out", "--overwrite_output_dir") == 0
    assert _main("--config.training.output_dir", "out", "--config.training.resume_from_checkpoint", "true") == 0
    assert (
        _main("--config.training.output_dir", "out", "--config.training.resume_from_checkpoint", "out/checkpoint-4")
        == 0
    )
    assert len(captured) == 3


def test_help_returns_zero_without_training(captured, capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["train", "-h"]) == 0
    assert captured == []
    assert "--config.tracker.enable_spectral_tracking" in capsys.readouterr().out


def test_tokenizers_parallelism_is_turned_off(captured, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert _main() == 0
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_config_error_raised_inside_train_is_one_line(monkeypatch, tmp_path, capsys):
    from perl.config import ConfigError

    def train(config):
        raise ConfigError("something the trainer found is wrong.")

    fake = types.ModuleType("perl.train")
    fake.train = train
    monkeypatch.setitem(sys.modules, "perl.train", fake)
    monkeypatch.chdir(tmp_path)
    _model_dir(tmp_path)
    assert _main() == 2
    assert capsys.readouterr().err == "perlwb: error: something the trainer found is wrong.\n"


# ------------------------------------------------------------------------------ other commands


def test_subcommands_are_delegated_with_their_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("perl.sweep")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "perl.sweep", fake)
    assert cli.main(["sweep", "grid.yaml", "--dry-run"]) == 3
    assert seen["argv"] == ["grid.yaml", "--dry-run"]


def test_missing_subcommand_module_says_not_available(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "report", ("perl._no_such_module_for_tests", "the HTML report"))
    assert cli.main(["report", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not available" in err and "perlwb report" in err


def test_only_rank_zero_judges_the_output_dir(captured, tmp_path, monkeypatch):
    # under `accelerate launch`, rank 0 writes config.yaml before the other ranks check the folder
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("{}")
    monkeypatch.setenv("RANK", "1")
    assert _main("--config.training.output_dir", "out") == 0
    monkeypatch.setenv("RANK", "0")
    assert _main("--config.training.output_dir", "out") == 2
    assert len(captured) == 1


def test_subcommand_help_returns_its_exit_code(monkeypatch):
    fake = types.ModuleType("perl.sweep")

    def main(argv):
        raise SystemExit(0)

    fake.main = main
    monkeypatch.setitem(sys.modules, "perl.sweep", fake)
    assert cli.main(["sweep", "--help"]) == 0


def test_a_distributed_rank_ends_with_its_output_and_exit_handlers(tmp_path):
    # a rank that leaves before the interpreter's teardown still prints all it wrote and runs the
    # exit handlers (loggers, experiment trackers), and its exit code is the one given
    marker = tmp_path / "handler-ran"
    script = (
        "import atexit, sys\n"
        "from perl.cli import _exit_without_teardown\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.stdout.write('all of it, unflushed')\n"
        "sys.stderr.write('and this')\n"
        "_exit_without_teardown(3)\n"
        "print('never')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "all of it, unflushed", "and this")
    assert marker.read_text() == "yes"
