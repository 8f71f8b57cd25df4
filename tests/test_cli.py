"""The `relora` command line as people expect it: every command and option explained, usage
errors and input errors told apart by the exit code, progress on stderr through logging."""

import argparse
import logging
import re
from pathlib import Path

import pytest
import yaml

from relora.cli import EXIT_DIVERGED, EXIT_INPUT, EXIT_USAGE, build_parser, main


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def test_every_command_has_a_description_and_every_option_a_help():
    parser = build_parser()
    commands = subcommands(parser)
    assert {"train", "describe", "evaluate", "dynamics", "aggregate", "figures", "report", "sql",
            "corpus", "tokenizer", "tokenize", "probe", "blimp", "manifest", "export-hf"} <= set(commands)
    summaries = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
    missing = []
    for name, command in commands.items():
        if not command.description or not summaries.get(name):
            missing.append(f"relora {name}: no description or summary")
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # -h; options hidden on purpose (e.g. train --stop-after, for tests)
            if not action.help:
                missing.append(f"relora {name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, "\n".join(missing)


def test_every_command_takes_the_same_logging_and_override_options():
    for name, command in subcommands(build_parser()).items():
        options = {s for a in command._actions for s in a.option_strings}
        assert {"-v", "-q", "--verbose", "--quiet"} <= options, name
        assert not options & {"--override", "--overrides"}, name  # one spelling: --set
        if "--config" in options and name != "report":  # report only shows the study file
            assert "--set" in options, name
            set_action = next(a for a in command._actions if "--set" in a.option_strings)
            assert set_action.dest == "overrides", name


def test_usage_errors_exit_with_2(capsys):
    for argv in (["train"], ["no-such-command"], ["describe", "--config", "s.yaml", "--no-such-option"],
                 ["train", "--config", "s.yaml", "--size", "s", "--condition", "c", "--seed", "one",
                  "--data", "d", "--out", "o"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == EXIT_USAGE == 2, argv
        assert "error:" in capsys.readouterr().err


def test_figures_only_names_the_valid_figures(tmp_path, capsys):
    from relora.plots import FIGURES

    figures = subcommands(build_parser())["figures"]
    only = next(a for a in figures._actions if "--only" in a.option_strings)
    assert all(name in only.help for name in FIGURES)
    with pytest.raises(SystemExit) as exit_info:
        main(["figures", "--db", str(tmp_path / "s.duckdb"), "--out-dir", str(tmp_path / "f"),
              "--only", "train_loss", "no_such_figure"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no_such_figure" in err
    assert all(name in err for name in FIGURES)
    assert not (tmp_path / "f").exists()


def test_a_bad_study_file_exits_with_the_input_code_naming_file_and_key(tmp_path, capsys):
    study = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())  # the default study
    study["training"]["lr"] = -1
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    assert main(["describe", "--config", str(config)]) == EXIT_INPUT == 3
    captured = capsys.readouterr()
    assert re.search(rf"^\S+ \S+ relora describe: error: invalid study config\n  {re.escape(str(config))}: "
                     r"training.lr: -1 is less than or equal to the minimum of 0\n$", captured.err), captured.err
    assert "Traceback" not in captured.err and captured.out == ""

    assert main(["describe", "--config", str(tmp_path / "missing.yaml")]) == 3
    err = capsys.readouterr().err
    assert f"relora describe: error: {tmp_path / 'missing.yaml'}: study config not found" in err

    config.write_text("study: [unclosed\n")
    assert main(["describe", "--config", str(config)]) == 3
    assert str(config) in capsys.readouterr().err


def test_exit_codes_are_distinct():
    assert len({0, 1, EXIT_USAGE, EXIT_INPUT, EXIT_DIVERGED}) == 5


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    """A bug is not an input error: it propagates (Python prints the traceback, exit code 1)."""
    import relora.describe

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(relora.describe, "describe_study", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["describe", "--config", str(Path(__file__).parents[1] / "config.yaml")])


def test_progress_goes_to_stderr_and_follows_v_and_q(tmp_path, capsys):
    """`relora manifest` logs what it wrote at INFO: shown by default, hidden by -q; errors shown
    even with -qq; stdout stays empty (it is for a command's own output)."""
    data = tmp_path / "data"
    (data / "stages").mkdir(parents=True)
    (data / "train.npy").write_bytes(b"tokens")
    from relora.data.manifest import write_stage

    write_stage(data, "tokenize", [data / "train.npy"], {})
    assert main(["manifest", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^\S+ \S+ relora manifest: manifest: 1 files -> .*manifest\.json$", captured.err, re.M)
    assert captured.out == ""

    assert main(["manifest", "--data", str(data), "-q"]) == 0
    assert capsys.readouterr().err == ""

    assert main(["manifest", "--data", str(tmp_path / "nowhere"), "-qq"]) == 3
    assert "relora manifest: error:" in capsys.readouterr().err

    assert main(["manifest", "--data", str(tmp_path / "nowhere"), "-v"]) == 3
    assert "Traceback" in capsys.readouterr().err  # -v: the error's traceback too
    assert logging.getLogger("relora").handlers == []  # main leaves logging as it found it


def test_a_closed_output_pipe_ends_quietly(repo):
    """`relora describe ... | head -0`: the reader is gone before the table is written; no error
    line, no traceback, exit 141 (128 + SIGPIPE)."""
    import subprocess
    import sys

    reader = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
    reader.wait(timeout=60)  # the pipe's read end is closed now
    result = subprocess.run([sys.executable, "-m", "relora", "describe", "--config",
                             str(repo / "config.yaml")],
                            stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=300)
    reader.stdin.close()
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""
