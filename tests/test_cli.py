"""The one command-line door (gspn_lightning.cli): the dispatcher lists and runs every tool, each tool's
help names it ``gspn SUB``, the console script of pyproject resolves to it, ``python cli.py`` still works,
configs are read in omegaconf mode, every shipped config is instantiated by a config test, and the
tasks package imports no command-line code and no data writer."""

from __future__ import annotations

import ast
import importlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from gspn_lightning.cli import COMMANDS, LIGHTNING_COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]

#: the subcommands the docs name (the dispatcher must offer exactly these)
EXPECTED = [
    "fit", "validate", "test", "predict", "sample", "evaluate", "stats", "fid", "convert-inception",
    "write-shards", "write-demo-mnist", "write-captions", "encode-latents", "distill-export", "export-model",
    "sdxl-swap", "generate", "t2i-eval", "build-kernels", "models",
]  # fmt: skip


def _listed(text: str) -> list[str]:
    """The subcommand names of a ``gspn --help`` text, in order (the indented two-column lines)."""
    return [line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.strip()]


def test_help_lists_every_subcommand_with_a_description(capsys):
    assert list(COMMANDS) == EXPECTED
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert _listed(out) == EXPECTED
    for name, (_, description) in COMMANDS.items():
        assert f"  {name} " in out and description in out, name
    assert main([]) == 2  # no subcommand: the same list, and a usage error
    assert "write-captions" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in EXPECTED if n not in LIGHTNING_COMMANDS])
def test_each_tool_has_its_own_help_named_gspn_sub(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gspn {name} ")
    module = importlib.import_module(f"gspn_lightning.cli.{COMMANDS[name][0]}")
    assert module.PROG == f"gspn {name}"


def test_lightning_subcommand_help_is_lightnings_under_gspn(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gspn"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gspn ") and " fit " in out.splitlines()[0]
    assert "--trainer.max_steps" in out and "--checkpoint.monitor" in out and "--ckpt_path" in out


def test_top_level_help_imports_no_tool():
    """``gspn --help`` is instant: no tool module, torch or Lightning is imported for it."""
    code = (
        "import sys\nfrom gspn_lightning.cli import main\nassert main(['--help']) == 0\n"
        "heavy = [m for m in ('torch', 'lightning', 'numpy') if m in sys.modules]\n"
        "tools = [m for m in sys.modules if m.startswith('gspn_lightning.') and m != 'gspn_lightning.cli']\n"
        "assert not heavy and not tools, (heavy, tools)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_pyproject_console_script_resolves_to_the_dispatcher(capsys):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["scripts"]["gspn"]
    module, _, attr = target.partition(":")
    entry = getattr(importlib.import_module(module), attr)
    assert callable(entry) and entry(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in EXPECTED)
    packages = project["tool"]["setuptools"]["packages"]
    assert module in packages and "gspn_lightning.cli" in packages


def test_module_entry_and_cli_py_shim():
    """``python -m gspn_lightning.cli`` (no install needed) and ``python cli.py`` (the old door) are the
    same command: the list, and a tool's own help under its gspn name."""
    for argv in (["-m", "gspn_lightning.cli", "--help"], ["cli.py", "--help"]):
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert all(f"  {name} " in r.stdout for name in EXPECTED), argv
    r = subprocess.run(
        [sys.executable, "cli.py", "write-demo-mnist", "--help"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("usage: gspn write-demo-mnist"), r.stderr[-3000:]


def test_stats_tells_shards_from_image_folders(tmp_path, capsys):
    """One ``stats`` command for both kinds of source: shards need the samples' --size; a folder or .npz
    is used as it is and refuses --size (the Inception part is tested in test_metrics/test_dit_task)."""
    from gspn_lightning.data.write_shards import write_shards

    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (10, 20, 30)).save(buf, format="PNG")
    write_shards([{"__key__": "a", "png": buf.getvalue(), "cls": 0}], tmp_path / "shards", progress=False)
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (6, 6)).save(tmp_path / "folder" / "x.png")
    out = str(tmp_path / "ref.npz")
    for args, message in (
        ([str(tmp_path / "shards"), out], "image shards need --size"),
        ([str(tmp_path / "folder"), out, "--size", "8"], "--size and --center-crop apply to image shards"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["stats", *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_configs_are_read_in_omegaconf_mode(tmp_path, monkeypatch):
    """A config may interpolate its own values with ``${...}`` (LightningCLI's omegaconf parser mode)."""
    from gspn_lightning.cli.lightning import main as lightning_main

    monkeypatch.setattr(sys, "argv", ["gspn"])
    config = yaml.safe_load((ROOT / "configs/classification/debug_mnist.yaml").read_text())
    config["trainer"]["max_steps"] = "${trainer.log_every_n_steps}"
    config["data"]["init_args"]["test_shards"] = "${data.init_args.train_shards}"
    path = tmp_path / "interpolated.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = lightning_main(args=["--config", str(path)], run=False)
    assert cli.trainer.max_steps == config["trainer"]["log_every_n_steps"] == 10
    assert cli.config["data"]["init_args"]["test_shards"] == config["data"]["init_args"]["train_shards"]


def test_every_shipped_config_is_instantiated_by_a_config_test():
    """The config tests of the three tasks (test_classification, test_dit_task, test_distill) go
    through the new door (gspn_lightning.cli.lightning); together they cover every shipped config."""
    from tests import test_classification, test_distill, test_dit_task

    covered = {
        *test_classification.CONFIGS, *test_dit_task.DIT_CONFIGS, *test_dit_task.OVERLAYS,
        *(ROOT / "configs/sdxl" / c for c in test_distill.SDXL_CONFIGS + test_distill.SDXL_OVERLAYS),
    }  # fmt: skip
    shipped = set((ROOT / "configs").rglob("*.yaml"))
    assert shipped and shipped == {p.resolve() for p in covered}
    for module in (test_classification, test_dit_task, test_distill):
        assert "gspn_lightning.cli.lightning import main" in Path(module.__file__).read_text()


# ------------------------------------------------------------------ tasks/ holds LightningModules only

#: modules of the data writers (and the names of the writing functions where the module also holds
#: a data module), which tasks must not import
WRITER_MODULES = {"gspn_lightning.data.write_shards", "gspn_lightning.data.mnist_demo"}
WRITER_NAMES = {"write_shards", "build_mnist_demo", "encode_shards", "write_caption_shards", "folder_samples"}


def _imports(path: Path):
    """Every import of a module, at any depth (function-local ones too): (module, names) with relative
    imports resolved against the ``gspn_lightning.tasks`` package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = "gspn_lightning.tasks".split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            yield base, [alias.name for alias in node.names]


def _offences(path: Path) -> list[str]:
    bad = []
    for module, names in _imports(path):
        targets = [module] + [f"{module}.{n}" for n in names]
        if any(t == "gspn_lightning.cli" or t.startswith("gspn_lightning.cli.") for t in targets):
            bad.append(f"{module} {names}: command-line code")
        if any(t in WRITER_MODULES for t in targets):
            bad.append(f"{module} {names}: a data writer module")
        if module.startswith("gspn_lightning.data") and WRITER_NAMES & set(names):
            bad.append(f"{module} {sorted(WRITER_NAMES & set(names))}: a data writer")
    return bad


def test_tasks_import_no_data_writer_and_no_command_line_code():
    files = sorted((ROOT / "gspn_lightning/tasks").glob("*.py"))
    assert len(files) >= 5
    offences = {f.name: _offences(f) for f in files}
    assert not any(offences.values()), offences


def test_importing_the_tasks_loads_no_writer_and_no_command_line_module():
    """The same at run time, in a fresh interpreter: what ``import gspn_lightning.tasks`` pulls in
    (through packages' ``__init__`` too) holds no data writer and nothing of the command line."""
    code = (
        "import sys, gspn_lightning.tasks\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('gspn_lightning.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(out.stdout.split())
    assert "gspn_lightning.tasks.diffusion" in loaded  # the probe sees the tasks' own imports
    assert not loaded & WRITER_MODULES, sorted(loaded & WRITER_MODULES)
    assert not [m for m in loaded if m == "gspn_lightning.cli" or m.startswith("gspn_lightning.cli.")]


def test_the_import_walk_sees_function_local_and_relative_imports(tmp_path):
    """The walk above would catch what tasks/ used to hold (so passing it means something)."""
    src = tmp_path / "task.py"
    src.write_text(
        "def main():\n"
        "    from gspn_lightning.data.write_shards import IMAGE_EXTENSIONS\n"
        "    from ..data.captions import write_caption_shards\n"
        "    from ..cli import sample\n"
        "    import gspn_lightning.cli.stats\n"
    )
    assert len(_offences(src)) == 4, _offences(src)
