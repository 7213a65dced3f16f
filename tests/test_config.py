"""The TOML loader: types, overrides, unknown keys with suggestions."""

import dataclasses
from dataclasses import dataclass, field

import pytest

from config import ConfigError, load_config


@dataclass
class Optim:
    lr: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "linear"


@dataclass
class Data:
    train_files: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    truncate: bool = False


@dataclass
class Root:
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_file_then_overrides_with_coercion(tmp_path):
    path = write(tmp_path, '[optim]\nlr = 3e-4\nwarmup_steps = 10\n[data]\ntrain_files = ["a.jsonl"]\n')
    cfg = load_config(Root, path, ["optim.warmup_steps=25", "optim.schedule=cosine", "data.truncate=true",
                                   "data.train_files=x.jsonl,y.jsonl", "data.weights=[1, 2.5]", "optim.lr=1"])
    assert cfg.optim == Optim(lr=1.0, warmup_steps=25, schedule="cosine")
    assert cfg.data == Data(train_files=["x.jsonl", "y.jsonl"], weights=[1.0, 2.5], truncate=True)
    assert isinstance(cfg.optim.lr, float)


def test_defaults_untouched(tmp_path):
    cfg = load_config(Root, write(tmp_path, ""))
    assert dataclasses.asdict(cfg) == dataclasses.asdict(Root())


@pytest.mark.parametrize("text,overrides,message", [
    ("[optim]\nlrr = 1\n", [], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("[optimm]\nlr = 1\n", [], "unknown section 'optimm' (did you mean 'optim'?)"),
    ("", ["optim.warmup_step=3"], "command line: unknown key 'optim.warmup_step' (did you mean 'optim.warmup_steps'?)"),
    ("", ["optim.warmup_steps=abc"], "command line: optim.warmup_steps: expected int"),
    ("[optim]\nlr = \"fast\"\n", [], "optim.lr: expected float"),
    ("", ["lr=3"], "is not section.key=value"),
    ("[optim\n", [], "c.toml"),
])
def test_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Root, write(tmp_path, text), overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(Root, "nope.toml")


def test_readme_config_reference_is_current():
    """The README's key tables are scripts/config_reference.py's output: a new or renamed key shows up here."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    generated = subprocess.run([sys.executable, str(root / "scripts" / "config_reference.py")], capture_output=True,
                               text=True, check=True).stdout.strip()
    assert generated in (root / "README.md").read_text()
