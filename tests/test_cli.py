"""The command line surface: --help, --version, and every registered command's --help (found dynamically)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from capcli import __version__
from capcli.cli import app
from capcli.layout import Dataset, ImageRecord

COMMANDS = typer.main.get_command(app).commands  # name -> command, whatever is registered now
ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def _run(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV, prog_name="capcli")


def _flat(text: str) -> str:
    """Help output without Rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_root_help_lists_every_command() -> None:
    r = _run("--help")
    assert r.exit_code == 0, r.output
    assert "Usage: capcli" in r.output and "--version" in r.output
    assert {"prepare", "info"} <= set(COMMANDS)
    for name, cmd in COMMANDS.items():
        assert re.search(rf"│ {re.escape(name)}\s", r.output), f"{name} is not listed in capcli --help"
        first_line = (cmd.help or "").strip().splitlines()[0]
        assert _flat(first_line)[:40] in _flat(r.output), f"{name}'s summary is missing from capcli --help"


def test_no_arguments_shows_help() -> None:
    r = _run()
    assert "Usage: capcli" in r.output and "Traceback" not in r.output


def test_version() -> None:
    r = _run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"capcli {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", __version__)


def test_installed_entry_point() -> None:
    """The `capcli` console script really runs (the same interpreter's bin folder)."""
    exe = Path(sys.executable).parent / "capcli"
    if not exe.exists():
        pytest.skip("capcli is not installed as a console script in this environment")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"capcli {__version__}"


def test_help_does_not_import_torch() -> None:
    """Heavy imports live inside the commands, so `capcli --help` stays fast."""
    code = "import sys, capcli.cli; print(sorted(m for m in ('torch', 'torchvision', 'h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing capcli.cli imports {out.stdout.strip()}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_mentions_every_option(name: str) -> None:
    r = _run(name, "--help")
    assert r.exit_code == 0, r.output
    assert f"Usage: capcli {name}" in r.output
    flat = _flat(r.output)
    cmd = COMMANDS[name]
    if cmd.help:
        assert _flat(cmd.help.split("\n\n")[0])[:60] in flat
    for p in cmd.params:
        if p.param_type_name == "option":
            for opt in p.opts:
                assert opt in r.output, f"capcli {name} --help does not mention {opt}"
        else:
            assert p.name.lower() in r.output.lower(), f"capcli {name} --help does not mention argument {p.name}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_texts_are_shown_whole(name: str) -> None:
    """Rich markup eats a bracketed "[default: ...]" in a help string: write "(default: ...)" or "\\[" instead."""
    flat = _flat(_run(name, "--help").output)
    for p in COMMANDS[name].params:
        text = getattr(p, "help", None)
        if text:
            shown = _flat(text.replace("\\[", "["))
            assert shown in flat, f"capcli {name}: help of {p.name!r} is not shown whole: {text!r}"


def test_unknown_command_and_missing_argument_fail_cleanly() -> None:
    r = _run("frobnicate")
    assert r.exit_code != 0 and "Traceback" not in r.output and "frobnicate" in r.output
    r = _run("prepare")
    assert r.exit_code == 2 and "Traceback" not in r.output and "Missing argument" in r.output


def test_info_on_an_empty_root(tmp_path) -> None:
    r = _run("info", "--root", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert str(tmp_path) in r.output and "efficientnet-lite0" in r.output and __version__ in r.output
    assert re.search(r"datasets\s+-", r.output)


@pytest.mark.parametrize("name", [None, *sorted(COMMANDS)])
def test_flags_show_no_value_in_help(name: str | None) -> None:
    """A flag (--help, --version, --resume, ...) takes no value: no ``<bool>`` beside it; valued options keep theirs."""
    r = _run(*([name] if name else []), "--help")
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output, r.output
    assert re.search(r"--help\s+Show this message", r.output)
    if name == "caption":
        assert re.search(r"--beam\s+<int", r.output)


def test_the_data_root_goes_before_or_after_the_command(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CAPCLI_HOME", raising=False)
    (tmp_path / "a" / "datasets" / "mine").mkdir(parents=True)
    r = _run("--root", str(tmp_path / "a"), "info")
    assert r.exit_code == 0, r.output
    assert str(tmp_path / "a") in _flat(r.output) and re.search(r"datasets\s+mine", r.output)
    monkeypatch.setenv("CAPCLI_HOME", str(tmp_path / "env"))
    r = _run("--root", str(tmp_path / "a"), "info", "--root", str(tmp_path / "b"))  # the command's own wins
    assert r.exit_code == 0 and str(tmp_path / "b") in _flat(r.output) and re.search(r"datasets\s+-", r.output)
    r = _run("info")  # the environment variable
    assert r.exit_code == 0 and str(tmp_path / "env") in _flat(r.output)


def test_info_says_what_auto_precision_picks_and_whether_java_is_there(tmp_path) -> None:
    import shutil

    import torch

    from capcli.runtime import resolve_precision

    r = _run("info", "--root", str(tmp_path))
    flat = _flat(r.output)
    auto = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert f"search precision {auto} (what --precision auto picks" in flat, flat
    java = shutil.which("java")
    assert (f"java {java}" in flat) if java else ("java not found" in flat)


def test_an_unknown_model_name_lists_the_shipped_ones(tmp_path) -> None:
    from capcli.captioner import SHIPPED_MODELS

    r = _run("caption", str(tmp_path), "-o", str(tmp_path / "out.json"), "--model", "fancy")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "checkpoint not found: fancy" in r.output and all(n in r.output for n in SHIPPED_MODELS), r.output
    assert set(SHIPPED_MODELS) == {"attention", "basic"}


def test_the_eta_comes_from_the_rate_shown() -> None:
    from capcli.terminal import eta_text

    assert eta_text(0, 7091, 0.0) == "-:--:--" and eta_text(10, None, 1.0) == "-:--:--"
    # 128 of 7,091 images after 1.59 s (80.5 img/s): about 86 s to go, not 0:00:01
    assert eta_text(128, 7091, 128 / 80.5) == "0:01:26"
    assert eta_text(7091, 7091, 88.0) == "0:00:00"
    assert eta_text(1, 3601, 1.0) == "1:00:00"


def test_the_progress_bar_eta_survives_a_burst() -> None:
    """128 results arriving at once (one search batch) after 0.2 s: the ETA is the bar's rate's, ~11 s, not ~0."""
    import io
    import time

    from rich.console import Console

    from capcli.terminal import RichProgress

    buf = io.StringIO()
    bar = RichProgress(console=Console(file=buf, width=200))
    t0 = time.perf_counter()
    bar.start("captioning", total=7091)
    t1 = time.perf_counter()
    time.sleep(0.2)  # (the bar's own elapsed time is measured around it: a busy machine only makes it longer)
    t2 = time.perf_counter()
    bar.advance(128)
    t3 = time.perf_counter()
    bar.done()
    h, m, s = map(int, re.search(r"ETA (\d+):(\d\d):(\d\d)", buf.getvalue()).groups())
    left = (7091 - 128) / 128  # photos to go per photo done: the ETA is the elapsed time times this
    assert (t2 - t1) * left - 1 <= 3600 * h + 60 * m + s <= (t3 - t0) * left + 1, buf.getvalue()


def test_outputs_that_are_folders_or_under_a_file_are_one_error_line(tmp_path, example_photos) -> None:
    """-o / --html naming a folder, an output under a file, a run folder that is a file: one `error:` line and a
    non-zero exit, never a traceback; the captions already written stay."""
    photo = str(next(p for p in example_photos if p.name == "chelsea.jpg"))
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "report").mkdir()
    (tmp_path / "afile").write_text("mine")
    ds_dir = tmp_path / "ds"
    Dataset("photos", Path(photo).parent, [ImageRecord(1, "chelsea.jpg", "train", ["a cat"])]).save(ds_dir)
    cases = [
        (["caption", photo, "-o", str(tmp_path / "folder.json")], "it is a folder"),
        (["caption", photo, "-o", str(tmp_path / "afile" / "x.json")], "cannot write"),
        (["caption", photo, "-o", str(tmp_path / "ok.json"), "--html", str(tmp_path / "report")], "it is a folder"),
        (["caption", photo, "-o", str(tmp_path / "ok.json"), "--html", str(tmp_path / "afile" / "r.html")],
         "cannot make its folder"),
        (["train", "--data", str(ds_dir), "--out", str(tmp_path / "afile")], "is a file"),
    ]
    for args, says in cases:
        r = _run(*args)
        assert r.exit_code != 0 and "Traceback" not in r.output, (args, r.output)
        assert r.stderr.count("error:") == 1, (args, r.stderr)
        if says:
            assert says in r.stderr, (args, r.stderr)
        assert "--resume" not in r.stderr  # resuming cannot mend a path
    assert not (tmp_path / "ok.json").exists()  # the --html folder was refused before any captioning
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_mistyped_path_is_one_error_line_before_the_model_loads(tmp_path, example_photos) -> None:
    """-o in a folder that does not exist, or an input that does not exist: one error line, before the model is
    loaded (no "model ..." line), and no folder made; --create-dirs makes -o's folders."""
    photo = str(next(p for p in example_photos if p.name == "chelsea.jpg"))
    missing = tmp_path / "no" / "such"
    r = _run("caption", photo, "-o", str(missing / "x.json"))
    assert r.exit_code == 2 and r.stderr.count("error:") == 1, r.output
    assert "does not exist" in r.stderr and "--create-dirs" in r.stderr
    assert "model " not in r.stdout and not (tmp_path / "no").exists()
    r = _run("caption", str(tmp_path / "nophotos"), "-o", str(tmp_path / "x.json"))
    assert r.exit_code == 2 and "no such file or folder" in r.stderr and "model " not in r.stdout, r.output
    r = _run("caption", photo, "-o", str(missing / "x.json"), "--create-dirs", "--grounding", "off")
    assert r.exit_code == 0, r.output
    assert (missing / "x.json").is_file()


def test_a_mistyped_option_suggests_only_options_that_look_like_it() -> None:
    r = _run("caption", "x.jpg", "--bogus")
    assert r.exit_code == 2 and "No such option: --bogus" in r.output and "Possible options" not in r.output
    r = _run("caption", "x.jpg", "--reusme")
    assert r.exit_code == 2 and "--resume" in r.output and "--out" not in r.output.split("No such option")[1]
