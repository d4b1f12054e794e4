from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gkd.config import ConfigError, load_run_config
from gkd.config.loader import apply_overrides
from gkd.plugins import load_plugin_manager

EXAMPLE = Path(__file__).parents[3] / "examples" / "reuters-minilm" / "config.yaml"


@pytest.fixture(scope="module")
def registry():
    return load_plugin_manager().registry


def write_checkpoint(path: Path, **overrides) -> Path:
    path.mkdir(parents=True)
    cfg = {"model_type": "bert", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
           "intermediate_size": 128} | overrides
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").write_bytes(b"")  # validation checks that weights exist, not what they hold
    return path


def base_config(tmp_path: Path) -> dict:
    write_checkpoint(tmp_path / "teacher")
    write_checkpoint(tmp_path / "teacher2")
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    return {
        "task": {"type": "sequence_classification"},
        "data": {"train": {"path": "train.jsonl"}},
        "teachers": [{"name": "big", "path": "teacher"}, {"name": "big2", "path": "teacher2"}],
        "student": {"init": {"strategy": "truncate", "teacher": "big", "num_layers": 2}},
        "stages": [{"name": "kd", "steps": 5, "teachers": ["big"], "methods": [{"name": "kd"}]}],
    }


def load(tmp_path: Path, cfg: dict, registry, overrides=()):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_run_config(path, overrides, registry=registry)


def messages(tmp_path, cfg, registry, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, cfg, registry, overrides)
    return [str(i) for i in info.value.issues]


def test_shipped_example_is_valid(registry):
    run = load_run_config(EXAMPLE, registry=registry)
    assert [s.name for s in run.stages] == ["teacher-finetune", "tinybert", "kd"]
    assert run.stages[0].trains_teacher == "minilm"
    kd = run.stages[2].methods[0]
    # method defaults filled from the method's schema, user values kept
    assert kd.config == {"temperature": 2.0, "soft_loss": "kl", "hard_weight": 1.0, "soft_weight": 1.0}
    assert run.stages[1].optimizer.lr == 2e-4 and run.stages[1].optimizer.weight_decay == 0.01
    # a stage's partial block keeps the top-level values it does not name
    assert run.stages[2].training.batch_size == 16 and run.stages[2].training.eval_batch_size == 128
    assert run.teachers[0].path.joinpath("model.safetensors").is_file()
    assert run.teachers[0].dtype == "fp32" and run.task.head == "classification"
    assert run.student.init.layers == "strided" and run.student.init.num_layers == 3
    assert run.stages[1].used_teachers == ("minilm",)


def test_three_mistakes_three_lines(tmp_path, registry):
    cfg = base_config(tmp_path)
    cfg["stages"][0]["methods"][0]["config"] = {"temperature": -1}
    cfg["stages"][0]["stepz"] = 3
    cfg["student"]["init"]["teacher"] = "bgi"
    assert messages(tmp_path, cfg, registry) == [
        "stages[0].methods[0].config.temperature: -1 is less than or equal to the minimum of 0",
        "stages[0].stepz: unknown key; did you mean 'steps'?",
        "student.init.teacher: unknown teacher 'bgi'; did you mean 'big'?",
    ]


def test_cross_field_rules(tmp_path, registry):
    cfg = base_config(tmp_path)
    cfg["parallel"] = {"tensor_parallel": 3, "zero": {"stage": 2, "offload_param": True}}
    cfg["stages"][0]["teachers"] = ["big", "big2"]
    cfg["stages"].append({"name": "multi", "epochs": 1, "teachers": ["big"], "methods": [{"name": "tmkd"}]})
    cfg["stages"].append({"name": "ft", "steps": 1, "train": "teacher:nope"})
    found = messages(tmp_path, cfg, registry)
    assert "parallel.zero.offload_param: parameter offload needs ZeRO stage 3 (stage is 2)" in found
    assert "parallel.tensor_parallel: 3 must divide the attention heads of teacher 'big' (4)" in found
    assert "parallel.tensor_parallel: 3 must divide the attention heads of the student (4)" in found
    assert any(m.startswith("stages[0].methods[0].teachers: single-teacher method 'kd' reads one teacher") for m in found)
    assert "stages[1].methods[0].name: multi-teacher method 'tmkd' needs at least 2 teachers, this stage gives it 1" in found
    assert any(m.startswith("stages[2].train: unknown teacher 'nope'") for m in found)


def test_unknown_and_misplaced_methods(tmp_path, registry):
    cfg = base_config(tmp_path)
    cfg["stages"][0]["methods"] = [{"name": "tinybrt"}]
    (found,) = messages(tmp_path, cfg, registry)
    assert found.startswith("stages[0].methods[0].name: unknown method 'tinybrt'; did you mean 'tinybert'?")


def test_paths_and_truncation_ranges(tmp_path, registry):
    cfg = base_config(tmp_path)
    cfg["data"]["eval"] = {"path": "missing.jsonl"}
    cfg["student"]["init"] = {"strategy": "truncate", "teacher": "big", "layers": [0, 7]}
    found = messages(tmp_path, cfg, registry)
    assert any(m.startswith("data.eval.path: data file not found:") for m in found)
    assert "student.init.layers: layer indices [7] are out of range for a 4-layer teacher (0..3)" in found


def test_set_overrides(tmp_path, registry):
    cfg = base_config(tmp_path)
    run = load(tmp_path, cfg, registry, ["stages[0].steps=9", "training.batch_size=4", "stages[0].methods[0].config.temperature=3"])
    assert run.stages[0].steps == 9 and run.stages[0].training.batch_size == 4
    assert run.stages[0].methods[0].config["temperature"] == 3
    found = messages(tmp_path, cfg, registry, ["trainig.batch_size=4"])
    assert found == ["trainig: unknown key; did you mean 'training'?"]


def test_override_syntax_errors():
    cfg = {"stages": [{"name": "a"}]}
    issues = apply_overrides(cfg, ["noequals", "stages[3].steps=1", "stages[0].name.x=1"])
    assert [str(i) for i in issues] == [
        "--set: 'noequals' is not of the form key.path=value (e.g. stages[0].steps=100)",
        "stages[3]: index out of range in --set stages[3].steps (the list has 1 item(s))",
        "stages[0].name.x: cannot set a key inside a str (--set stages[0].name.x)",
    ]


def test_yaml_syntax_error_names_the_line(tmp_path, registry):
    path = tmp_path / "broken.yaml"
    path.write_text("task:\n  type: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_run_config(path, registry=registry)


def test_unsupported_checkpoint_family(tmp_path, registry):
    cfg = base_config(tmp_path)
    write_checkpoint(tmp_path / "gpt2", model_type="gpt2")
    cfg["teachers"][1]["path"] = "gpt2"
    found = messages(tmp_path, cfg, registry)
    assert any(m.startswith("teachers[1].path: model_type 'gpt2' in ") and m.endswith("is not supported (gkd reads bert, llama, mobilebert)")
               for m in found), found


def test_every_section_is_typed(tmp_path, registry):
    from gkd.config import (
        CheckpointConfig,
        ExportConfig,
        LoggingConfig,
        OptimizerConfig,
        ScheduleConfig,
        TaskConfig,
        TrainingConfig,
    )

    cfg = base_config(tmp_path)
    cfg["student"]["architecture"] = {"num_attention_heads": 2}
    cfg["export"] = {"dir": "out"}
    run = load(tmp_path, cfg, registry)
    assert isinstance(run.task, TaskConfig) and run.task.max_length == 128
    assert isinstance(run.checkpoint, CheckpointConfig) and isinstance(run.logging, LoggingConfig)
    assert isinstance(run.export, ExportConfig) and run.export.dir is not None and run.export.dir.name == "out"
    stage = run.stages[0]
    assert isinstance(stage.optimizer, OptimizerConfig) and stage.optimizer.betas == (0.9, 0.999)
    assert isinstance(stage.schedule, ScheduleConfig) and isinstance(stage.training, TrainingConfig)
    assert run.student.architecture.model_overrides() == {"num_attention_heads": 2, "num_kv_heads": 2}


def test_published_teacher_is_a_default_teacher_of_later_stages(tmp_path, registry):
    cfg = base_config(tmp_path)
    cfg["teachers"] = cfg["teachers"][:1]
    cfg["stages"] = [
        {"name": "kd", "steps": 1, "methods": [{"name": "kd"}], "publish_as_teacher": "ta"},
        {"name": "two", "steps": 1, "methods": [{"name": "tmkd"}]},
    ]
    run = load(tmp_path, cfg, registry)
    assert run.stages[0].teachers == ("big",)
    assert run.stages[1].teachers == ("big", "ta") and run.stages[1].methods[0].teachers == ("big", "ta")


def test_features_that_do_not_fit_the_models_are_rejected_before_any_model_is_built(tmp_path, registry):
    cfg = base_config(tmp_path)
    cfg["student"]["architecture"] = {"num_attention_heads": 2}
    cfg["stages"][0]["methods"] = [{"name": "tinybert"}]
    found = messages(tmp_path, cfg, registry)
    assert len(found) == 1, found
    assert found[0].startswith("stages[0].methods[0].config.attention: ")
    assert "tinybert" in found[0] and "student" in found[0] and "teacher 'big'" in found[0]
    cfg["stages"][0]["methods"] = [{"name": "tinybert", "config": {"attention": False}}]
    assert load(tmp_path, cfg, registry).stages[0].methods[0].config["attention"] is False


def test_two_methods_claiming_the_hard_loss_are_refused_naming_both(tmp_path, registry):
    cfg = base_config(tmp_path)
    cfg["stages"][0]["teachers"] = ["big", "big2"]
    cfg["stages"][0]["methods"] = [{"name": "kd", "teachers": ["big"]}, {"name": "tmkd"}]
    found = messages(tmp_path, cfg, registry)
    assert found == ["stages[0].methods[1].config.hard_weight: methods 'kd' (methods[0].config.hard_weight) and 'tmkd' "
                     "both claim the hard (gold-label) loss; only one method of a stage may (set hard_weight: 0 on "
                     "one of them)"]
    cfg["stages"][0]["methods"][1]["config"] = {"hard_weight": 0}
    assert [m.name for m in load(tmp_path, cfg, registry).stages[0].methods] == ["kd", "tmkd"]
    cfg["stages"][0]["methods"].append({"name": "kd", "teachers": ["big2"]})
    assert messages(tmp_path, cfg, registry) == [
        "stages[0].methods[2].name: method 'kd' is selected twice in this stage; combine its settings in one entry"]


# ---------------------------------------------------------------- one vocabulary, offloaded teachers (issue 10)


def write_tokenizer(path: Path, tokens: list[str], fmt: str) -> None:
    """A tokenizer file with ``tokens`` at ids 0.. (tokenizer.json: WordPiece vocabulary, the
    first token also listed as an added token, as Hugging Face writes [PAD])."""
    if fmt == "tokenizer.json":
        data = {"version": "1.0", "added_tokens": [{"id": 0, "content": tokens[0], "special": True}],
                "model": {"type": "WordPiece", "unk_token": tokens[0], "vocab": {t: i for i, t in enumerate(tokens)}}}
        (path / "tokenizer.json").write_text(json.dumps(data))
    else:
        (path / "vocab.txt").write_text("".join(t + "\n" for t in tokens))


def test_teachers_and_students_with_another_vocabulary_are_refused_naming_both(tmp_path, registry):
    cfg = base_config(tmp_path)
    for name, size in (("teacher", 5), ("teacher2", 6)):
        (tmp_path / name / "config.json").write_text(json.dumps(
            json.loads((tmp_path / name / "config.json").read_text()) | {"vocab_size": size}))
    write_tokenizer(tmp_path / "teacher", ["[PAD]", "a", "b", "c", "d"], "tokenizer.json")
    write_tokenizer(tmp_path / "teacher2", ["[PAD]", "a", "x", "c", "d", "e"], "vocab.txt")
    write_checkpoint(tmp_path / "other-student", vocab_size=7)  # no tokenizer files: judged by its size
    cfg["stages"][0]["methods"] = []  # config.json files without "architectures": no task head for kd
    cfg["stages"].append({"name": "again", "steps": 1, "teachers": ["big"],
                          "student_init": {"strategy": "pretrained", "path": "other-student"}})
    assert messages(tmp_path, cfg, registry) == [
        "stages[1].student_init.path: the student's checkpoint (stages[1].student_init.path) has vocab_size 7 "
        "(config.json), the run's tokenizer (teacher 'big') 5; gkd feeds every model of a step the same token ids, "
        "so all need the run's tokenizer",
        "teachers[1].path: teacher 'big2' has vocab_size 6 (config.json), the run's tokenizer (teacher 'big') 5; "
        "gkd feeds every model of a step the same token ids, so all need the run's tokenizer",
        "teachers[1].path: teacher 'big2''s tokenizer (vocab.txt, 6 tokens, sha256 "
        f"{_table_sha(['[PAD]', 'a', 'x', 'c', 'd', 'e'])[:12]}) differs from the run's (teacher 'big': "
        f"tokenizer.json, 5 tokens, sha256 {_table_sha(['[PAD]', 'a', 'b', 'c', 'd'])[:12]}) at 2 ids, e.g. id 2 is "
        "'x' there and 'b' in the run's; gkd feeds every model of a step the same token ids, so all need the run's "
        "tokenizer",
    ]
    from click.testing import CliRunner

    from gkd.cli import cli

    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "run.yaml")])
    assert result.exit_code == 2 and "3 error(s)" in result.output and "Traceback" not in result.output
    # One vocabulary in two formats, and a checkpoint without tokenizer files of the right size: accepted.
    write_tokenizer(tmp_path / "teacher2", ["[PAD]", "a", "b", "c", "d"], "vocab.txt")
    for name in ("teacher2", "other-student"):
        (tmp_path / name / "config.json").write_text(json.dumps(
            json.loads((tmp_path / name / "config.json").read_text()) | {"vocab_size": 5}))
    assert [t.name for t in load(tmp_path, cfg, registry).teachers] == ["big", "big2"]


def _table_sha(tokens: list[str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted(enumerate(tokens)), ensure_ascii=False).encode()).hexdigest()


def test_offload_is_typed_and_published_teachers_take_the_strongest(tmp_path, registry):
    cfg = base_config(tmp_path)
    cfg["teachers"][1]["offload"] = "disk"
    cfg["stages"][0]["publish_as_teacher"] = "ta"
    run = load(tmp_path, cfg, registry)
    assert [t.offload for t in run.teachers] == ["none", "disk"]
    from gkd.config.run import strongest_offload

    assert strongest_offload(t.offload for t in run.teachers) == "disk"
    assert strongest_offload(["none", "cpu"]) == "cpu" and strongest_offload([]) == "none"
    cfg["teachers"][0]["offload"] = "gpu"
    assert messages(tmp_path, cfg, registry) == [
        "teachers[0].offload: 'gpu' is not one of ['none', 'cpu', 'disk']"]


def test_theseus_cannot_run_an_offloaded_teacher(tmp_path, registry):
    """Theseus takes the teacher's layers in setup and runs them inside the student's forward: an
    offloaded teacher has no weights there, so validation refuses the pair, naming both."""
    cfg = base_config(tmp_path)
    cfg["teachers"][0]["offload"] = "cpu"
    cfg["stages"][0]["methods"] = [{"name": "theseus"}]
    assert messages(tmp_path, cfg, registry) == [
        "teachers[0].offload: teacher 'big' cannot be offloaded ('cpu') for method 'theseus' (stages[0].methods[0]): "
        "it takes the models in Method.setup and may run the teacher's modules outside the teacher's own forward "
        "pass, where an offloaded teacher holds no weights; set offload: none, or use another method"]
    cfg["teachers"][0]["offload"] = "none"
    cfg["teachers"][1]["offload"] = "disk"  # not Theseus's teacher
    cfg["stages"][0]["publish_as_teacher"] = "ta"
    cfg["stages"].append({"name": "ta", "steps": 1, "teachers": ["ta"], "methods": [{"name": "theseus"}],
                          "student_init": {"strategy": "truncate", "teacher": "big", "num_layers": 1}})
    (found,) = messages(tmp_path, cfg, registry)
    assert found.startswith("stages[1].methods[0].name: method 'theseus' (stages[1].methods[0]) takes the models")
    assert "teacher 'ta' (published by an earlier stage) is offloaded ('disk'" in found
    cfg["stages"][1]["methods"] = [{"name": "kd"}]
    assert load(tmp_path, cfg, registry).teachers[1].offload == "disk"
