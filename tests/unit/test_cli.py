"""The command line as a user meets it: every option explains itself and its default,
`harness --help` answers without loading torch, and make echoes no comments."""

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_command
from harness import cli


def _load_launcher(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The real entry points' main(), called in this process: --help prints and exits
# as it does from a shell, without paying a torch import per page.
ENTRY_POINTS = {"harness": cli.main, **{f"{name}.py": _load_launcher(name).main for name in ("train", "sweep", "ray_job")}}
HARNESS_COMMANDS = ("gradcheck", "report", "interpolate", "bench", "replay", "mlflow-server")


def help_pages():
    for name in ENTRY_POINTS:
        yield name, ["--help"]
        if name == "harness":
            for sub in HARNESS_COMMANDS:
                yield f"harness {sub}", [sub, "--help"]


def help_text(name, args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[name](args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_entries(help_text: str) -> dict[str, str]:
    """Option -> its help text (wrapped lines joined), from the "options:" section of --help."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"^  (-[-\w]+)[^ ]*(?: [^ ].*?)?(?:  +(.*))?$", line)
        if match and not line.startswith("   "):
            current = match.group(1)
            entries[current] = match.group(2) or ""
        elif current and line.strip():
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("name,args", list(help_pages()), ids=[n + " " + a[0] for n, a in help_pages()])
def test_every_option_has_help_that_states_its_default(name, args, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = help_text(name.split()[0], args, capsys)
    entries = option_entries(text)
    assert "-h" in entries, text
    for option, text in entries.items():
        if option == "-h":
            continue
        assert text.strip(), f"{name} {option}: no help text"
        assert "default" in text or "(required)" in text, f"{name} {option}: help does not say its default: {text!r}"


def test_sweep_launcher_lists_its_choices_in_help(capsys):
    assert "--launcher {local,torchrun,ray}" in help_text("sweep.py", ["--help"], capsys)


@pytest.mark.parametrize("args,expected", [
    (["--launcher", "torchrun", "--num-workers", "2"], "--num-workers: only with --launcher ray"),
    (["--launcher", "ray", "--num-workers", "3", "--nproc", "2"], "--num-workers 3 and --nproc 2"),
])
def test_sweep_refuses_num_workers_that_would_override_nproc(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status = ENTRY_POINTS["sweep.py"](["--config", str(REPO / "configs/sweep.yaml"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not list(tmp_path.iterdir())  # refused before any store or checkpoint


def test_usage_errors_are_one_error_line_with_exit_2(capsys):
    assert ENTRY_POINTS["harness"](["bench", "--epochs", "many"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: argument --epochs: invalid int value: 'many'"]


def test_harness_help_does_not_import_torch():
    probe = ("import sys\nfrom harness import cli\n"
             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    result = run_command([sys.executable, "-c", probe], cwd=REPO)
    assert result.stdout.strip().splitlines()[-1] == "no torch", result.stdout + result.stderr


def test_make_echoes_no_comment_lines():
    targets = re.findall(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M)[0].split()
    # -n prints every command without running one; -B makes every target's recipe count.
    result = subprocess.run(["make", "-n", "-B", *targets], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    echoed = [line for line in result.stdout.splitlines() if line.lstrip().startswith("#")]
    assert not echoed, echoed


SUBCOMMANDS = ("gradcheck", "report", "interpolate", "escape", "bench", "capacity", "batch-size", "scaling", "replay",
               "mlflow-server")


@pytest.mark.parametrize("subcommand", [None, *SUBCOMMANDS])
def test_each_help_opens_with_one_plain_sentence(subcommand, capsys):
    from harness import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([subcommand, "--help"] if subcommand else ["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    first = text.split("\n\n")[1].replace("\n", " ")  # the paragraph after the usage lines
    assert first[0].isupper() and first.endswith("."), first
    assert not any(markup in first for markup in ("``", ":func:", ":class:", "`")), first


@pytest.mark.parametrize("overrides, name", [
    ([], "fashion-mnist"),
    (["optim.lr=0.05", "model.hidden_sizes=[256,128]"], "fashion-mnist lr=0.05 hidden_sizes=[256,128]"),
    (["tracking.uri=sqlite:///x.db", "checkpoint.dir=/tmp/c", "train.progress=false", "name=other"], "fashion-mnist"),
])
def test_a_single_run_is_named_by_its_config_and_what_its_overrides_change(overrides, name):
    from harness.launching.entrypoints import named_by_overrides

    assert named_by_overrides("fashion-mnist", overrides) == name
