"""perl.config: defaults, YAML round trip, typed overrides, validation, the hand-over to TRL."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap

import pytest

from perl.config import (
    OWN_TRAINING_FIELDS,
    PEFT_TYPES,
    SECTIONS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    to_grpo_kwargs,
    to_yaml,
    validate,
)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.endswith((".", "?")), message
    return message


# ------------------------------------------------------------------------------ defaults


def test_every_field_has_a_default_and_a_help_text():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            assert has_default, f"{section}.{f.name}"
            assert f.metadata.get("help", "").strip(), f"{section}.{f.name}"
    validate(TrainConfig())


def test_tracker_options_match_the_tracking_docs():
    # the nine options of TRACKING.md, with their documented defaults
    documented = {
        "enable_spectral_tracking": False,
        "enable_gradient_tracking": False,
        "spectral_log_frequency": 100,
        "gradient_log_frequency": 100,
        "track_adapter_only": True,
        "compute_full_svd": True,
        "max_layers_to_track": None,
        "save_with_checkpoints": True,
        "tracking_output_dir": None,
    }
    tracker = config_to_dict(TrainConfig())["tracker"]
    for name, default in documented.items():
        assert tracker[name] == default and type(tracker[name]) is type(default), name
    assert set(tracker) - set(documented) == {
        "top_k_singular_values",
        "enable_alignment_tracking",
        "alignment_log_frequency",
        "alignment_top_k",
        "intruder_log_frequency",
        "intruder_epsilon",
    }


def test_importing_config_and_cli_does_not_import_torch():
    code = "import sys, perl.config, perl.cli; print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_peft_types_are_those_the_adapter_registry_builds():
    adapters = pytest.importorskip("perl.adapters")
    assert set(PEFT_TYPES) == set(adapters.ALL_METHODS)


# ------------------------------------------------------------------------------ YAML round trip


def _non_default_config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.common.seed = 7
    cfg.common.debug = True
    cfg.model.model_name_or_path = "org/some-model"
    cfg.model.dtype = "bfloat16"
    cfg.peft.type = "adalora"
    cfg.peft.lora_dropout = 0.05
    cfg.peft.target_modules = ["q_proj", "v_proj"]
    cfg.peft.loraplus_lr_embedding = 3e-7
    cfg.peft.feedforward_modules = ["down_proj"]
    cfg.training.learning_rate = 1e-6
    cfg.training.run_name = "none"  # a string that looks like None on the command line
    cfg.training.resume_from_checkpoint = "true"
    cfg.training.max_prompt_length = 128
    cfg.training.epsilon_high = None
    cfg.training.bf16 = False
    cfg.training.lr_scheduler_kwargs = {"min_lr": 1e-7, "note": "yes"}
    cfg.training.report_to = ["tensorboard", "wandb"]
    cfg.training.output_dir = "runs/with: colon # and hash"
    cfg.dataset.example_numbers = None
    cfg.tracker.max_layers_to_track = 3
    cfg.tracker.tracking_output_dir = "null"
    return cfg


def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = _non_default_config()
    path = save_config(cfg, tmp_path / "deep" / "config.yaml")
    loaded = load_config(path)
    assert loaded == cfg
    assert config_to_dict(loaded) == config_to_dict(cfg)
    # and the text is stable: dumping the loaded config gives the same file
    assert to_yaml(loaded) == path.read_text()


def test_default_config_round_trips(tmp_path):
    path = save_config(TrainConfig(), tmp_path / "config.yaml")
    assert load_config(path) == TrainConfig()


def test_yaml_partial_file_and_yaml_spellings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            """
            peft:
              type: dora
              target_modules: q_proj, k_proj
            training:
              learning_rate: 5e-4        # PyYAML alone would read this as a string
              resume_from_checkpoint: true
              max_prompt_length: null
              num_train_epochs: 2
            tracker:
            """
        )
    )
    cfg = load_config(path)
    assert cfg.peft.type == "dora" and cfg.peft.r == 8
    assert cfg.peft.target_modules == ["q_proj", "k_proj"]
    assert cfg.training.learning_rate == 5e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.resume_from_checkpoint == "true"
    assert cfg.training.num_train_epochs == 2.0 and isinstance(cfg.training.num_train_epochs, float)
    assert cfg.tracker == TrainConfig().tracker


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(path) == TrainConfig()


# ------------------------------------------------------------------------------ overrides by type


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("peft.r", "16", 16),
        ("training.max_steps", "-1", -1),
        ("training.learning_rate", "5e-4", 5e-4),
        ("training.learning_rate", "0.001", 0.001),
        ("peft.lora_dropout", "0", 0.0),
        ("common.debug", "true", True),
        ("common.debug", "TRUE", True),
        ("common.debug", "yes", True),
        ("common.debug", "1", True),
        ("tracker.compute_full_svd", "false", False),
        ("tracker.compute_full_svd", "no", False),
        ("tracker.compute_full_svd", "0", False),
        ("model.model_name_or_path", "/models/qwen 1.5b", "/models/qwen 1.5b"),
        ("training.save_strategy", "no", "no"),  # a non-Optional str is never None
        ("peft.target_modules", "q_proj,v_proj", ["q_proj", "v_proj"]),
        ("peft.target_modules", " q_proj , v_proj ,", ["q_proj", "v_proj"]),
        ("peft.target_modules", "[q_proj, o_proj]", ["q_proj", "o_proj"]),
        ("peft.target_modules", "down_proj", ["down_proj"]),
        ("training.lr_scheduler_kwargs", "{min_lr: 1e-6, num_cycles: 2}", {"min_lr": 1e-6, "num_cycles": 2}),
        ("training.generation_kwargs", "{}", {}),
        ("training.epsilon_high", "none", None),
        ("training.epsilon_high", "0.3", 0.3),
        ("tracker.max_layers_to_track", "null", None),
        ("tracker.max_layers_to_track", "4", 4),
        ("tracker.tracking_output_dir", "None", None),
        ("training.resume_from_checkpoint", "true", "true"),
        ("training.bf16", "none", None),
        ("training.bf16", "true", True),
        ("peft.feedforward_modules", "none", None),
        ("peft.feedforward_modules", "down_proj", ["down_proj"]),
        ("dataset.example_numbers", "none", None),
    ],
)
def test_override_parses_by_declared_type(key, text, expected):
    base = TrainConfig()
    cfg = apply_overrides(base, {key: text})
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected and type(value) is type(expected)
    assert base == TrainConfig()  # the input is not modified


def test_overrides_accept_python_values():
    cfg = apply_overrides(TrainConfig(), {"peft.r": 4, "training.learning_rate": 1, "peft.target_modules": ["q_proj"]})
    assert cfg.peft.r == 4 and cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.peft.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    "key, text, words",
    [
        ("peft.r", "abc", ["peft.r", "integer", "'abc'"]),
        ("peft.r", "8.5", ["peft.r", "integer"]),
        ("training.learning_rate", "fast", ["training.learning_rate", "number"]),
        ("training.learning_rate", "nan", ["training.learning_rate", "number"]),
        ("common.debug", "maybe", ["common.debug", "true or false"]),
        ("training.lr_scheduler_kwargs", "[1, 2]", ["lr_scheduler_kwargs", "mapping"]),
        ("training.lr_scheduler_kwargs", "{a: [", ["lr_scheduler_kwargs", "mapping"]),
        ("peft.target_modules", "{a: 1}", ["target_modules", "list"]),
        ("peft.r", "none", ["peft.r", "integer"]),  # not Optional: none is not allowed
    ],
)
def test_override_of_the_wrong_type_is_refused(key, text, words):
    message = _error(apply_overrides, TrainConfig(), {key: text})
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("peft.rank", "peft.r"),
        ("peft.lora_aplha", "peft.lora_alpha"),
        ("trainig.max_steps", "training"),
        ("tracker.spectral_log_freq", "tracker.spectral_log_frequency"),
    ],
)
def test_unknown_key_suggests_the_closest(key, suggestion):
    message = _error(apply_overrides, TrainConfig(), {key: "1"})
    assert "unknown config" in message and f"did you mean '{suggestion}'" in message


def test_unknown_key_without_close_match_lists_the_section():
    message = _error(apply_overrides, TrainConfig(), {"peft.zzzzzzzz": "1"})
    assert "valid keys of 'peft'" in message and "target_modules" in message


def test_key_must_have_two_parts():
    assert "section.field" in _error(apply_overrides, TrainConfig(), {"r": "8"})


# ------------------------------------------------------------------------------ YAML errors


@pytest.mark.parametrize(
    "text, words",
    [
        ("peft:\n  type: [lora\n", ["malformed YAML", "line"]),
        ("peft: {r: 8\n", ["malformed YAML"]),
        ("- a\n- b\n", ["mapping of sections"]),
        ("peft: 3\n", ["section 'peft'", "mapping"]),
        ("pefts:\n  r: 8\n", ["unknown config section 'pefts'", "did you mean 'peft'"]),
        ("peft:\n  rank: 8\n", ["unknown config key 'peft.rank'", "did you mean 'peft.r'"]),
        ("peft:\n  r: eight\n", ["peft.r", "integer"]),
        ("training:\n  max_steps: true\n", ["training.max_steps", "integer"]),
    ],
)
def test_bad_yaml_files_are_refused(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = _error(load_config, path)
    for word in words:
        assert word in message, message


def test_missing_or_directory_config_file(tmp_path):
    assert "does not exist" in _error(load_config, tmp_path / "nope.yaml")
    assert "is a directory" in _error(load_config, tmp_path)


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert "UTF-8" in _error(load_config, path)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"peft.type": "lora2"}, ["peft.type", "lora, dora, adalora", "miss", "did you mean 'lora'"]),
        ({"model.attn_implementation": "flash"}, ["attn_implementation", "flash_attention_2, sdpa, eager"]),
        ({"training.loss_type": "ppo"}, ["loss_type", "dapo"]),
        ({"peft.r": "0"}, ["peft.r", ">= 1", "got 0"]),
        ({"peft.lora_dropout": "1.0"}, ["lora_dropout", "< 1.0"]),
        ({"peft.lora_dropout": "-0.1"}, ["lora_dropout", ">= 0.0"]),
        ({"tracker.spectral_log_frequency": "0"}, ["spectral_log_frequency", ">= 1"]),
        ({"tracker.gradient_log_frequency": "-100"}, ["gradient_log_frequency", ">= 1", "-100"]),
        ({"tracker.alignment_log_frequency": "0"}, ["alignment_log_frequency"]),
        ({"training.max_steps": "0"}, ["max_steps", "positive", "-1"]),
        ({"training.max_steps": "-2"}, ["max_steps", "positive"]),
        ({"training.num_generations": "1"}, ["num_generations", ">= 2"]),
        ({"training.learning_rate": "0"}, ["learning_rate", "> 0"]),
        ({"training.top_p": "1.5"}, ["top_p", "<= 1.0"]),
        ({"training.num_generations": "3"}, ["divisible by num_generations (3)"]),
        ({"peft.target_r": "16"}, ["target_r", "init_r"]),
        ({"peft.type": "adalora", "peft.tinit": "250", "peft.tfinal": "50"}, ["tinit + peft.tfinal", "max_steps"]),
        ({"peft.type": "miss", "peft.r": "8", "peft.miss_mini_r": "3"}, ["divisible by peft.miss_mini_r"]),
        ({"training.loss_type": "luspo"}, ["importance_sampling_level"]),
        ({"dataset.min_numbers": "5"}, ["min_numbers", "max_numbers"]),
        ({"peft.target_modules": "[]"}, ["target_modules", "at least one"]),
        ({"training.output_dir": " "}, ["output_dir", "empty"]),
        ({"training.resume_from_checkpoint": ""}, ["resume_from_checkpoint", "empty"]),
    ],
)
def test_validate_refuses_bad_values(overrides, words):
    cfg = apply_overrides(TrainConfig(), overrides)
    message = _error(validate, cfg)
    for word in words:
        assert word in message, message


def test_validate_accepts_every_peft_type_and_the_edges():
    for method in PEFT_TYPES:
        validate(apply_overrides(TrainConfig(), {"peft.type": method}))
    validate(apply_overrides(TrainConfig(), {"training.max_steps": "-1", "peft.lora_dropout": "0.99", "peft.r": "1"}))


def test_method_names_are_case_insensitive():
    # the original PeRL registers "IA3"; any spelling names the same method, stored in lower case
    for given, stored in (("IA3", "ia3"), ("DoRA", "dora"), (" LoRA_Plus ", "lora_plus"), ("MiLoRA", "milora")):
        cfg = validate(apply_overrides(TrainConfig(), {"peft.type": given}))
        assert cfg.peft.type == stored
        assert f"type: {stored}" in to_yaml(cfg)
    assert "did you mean 'lora'" in _error(validate, apply_overrides(TrainConfig(), {"peft.type": "LORA2"}))


def test_batch_divisibility_counts_processes(monkeypatch):
    cfg = apply_overrides(TrainConfig(), {"training.per_device_train_batch_size": "4"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "divisible" in _error(validate, cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate(cfg)


def test_validate_converts_values_set_from_python():
    cfg = TrainConfig()
    cfg.peft.r = "16"
    cfg.training.learning_rate = 1
    validate(cfg)
    assert cfg.peft.r == 16 and cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    cfg.peft.r = "sixteen"
    assert "peft.r" in _error(validate, cfg)


def test_config_from_dict_refuses_non_mapping():
    assert "mapping" in _error(config_from_dict, ["peft"])


# ------------------------------------------------------------------------------ hand-over to TRL


def _grpo_fields() -> dict:
    trl = pytest.importorskip("trl")
    return {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}


def test_training_fields_are_grpo_fields_or_our_own():
    grpo = _grpo_fields()
    ours = {f.name for f in dataclasses.fields(SECTIONS["training"])}
    not_in_trl = {name for name in ours if name not in grpo}
    assert not_in_trl == set(OWN_TRAINING_FIELDS), not_in_trl
    # the knob the issue names as gone from trl 1.16 is ours, never passed through
    assert "max_prompt_length" not in grpo


def test_loss_types_and_schedulers_are_those_of_the_installed_libraries():
    from transformers.trainer_utils import SchedulerType

    from perl.config import LOSS_TYPES, LR_SCHEDULERS

    grpo_help = _grpo_fields()["loss_type"].metadata["help"]
    for loss in LOSS_TYPES:
        assert f"'{loss}'" in grpo_help
    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_grpo_config_is_built_from_to_grpo_kwargs():
    from trl import GRPOConfig

    cfg = apply_overrides(
        TrainConfig(),
        {
            "common.seed": "11",
            "training.warmup_ratio": "0.1",
            "training.lr_scheduler_type": "cosine_with_min_lr",
            "training.lr_scheduler_kwargs": "{min_lr: 1e-6}",
            "training.max_prompt_length": "32",
            "training.gradient_checkpointing": "true",
        },
    )
    validate(cfg)
    kwargs = to_grpo_kwargs(cfg, cuda_available=False)
    assert set(kwargs) <= set(_grpo_fields())
    assert not set(kwargs) & set(OWN_TRAINING_FIELDS)
    args = GRPOConfig(**kwargs)
    t = cfg.training
    for name in (
        "learning_rate",
        "max_steps",
        "max_completion_length",
        "num_generations",
        "loss_type",
        "beta",
        "epsilon",
        "epsilon_high",
        "temperature",
        "lr_scheduler_type",
        "max_grad_norm",
        "per_device_train_batch_size",
        "save_strategy",
        "logging_steps",
    ):
        assert getattr(args, name) == getattr(t, name), name
    assert args.seed == 11
    assert args.bf16 is False  # dtype auto on a CPU is float32
    assert args.activation_checkpointing is True
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-6}
    assert args.get_warmup_steps(200) == math.ceil(200 * 0.1)


@pytest.mark.parametrize(
    "dtype, cuda, bf16",
    [("auto", False, False), ("auto", True, True), ("float32", True, False), ("bfloat16", False, True)],
)
def test_bf16_follows_the_model_dtype(dtype, cuda, bf16):
    pytest.importorskip("trl")
    cfg = apply_overrides(TrainConfig(), {"model.dtype": dtype})
    assert to_grpo_kwargs(cfg, cuda_available=cuda)["bf16"] is bf16
    explicit = apply_overrides(cfg, {"training.bf16": "false"})
    assert to_grpo_kwargs(explicit, cuda_available=cuda)["bf16"] is False
