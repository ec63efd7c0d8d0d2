"""Every mistake on the `ktrs` command line gets one clear line and exit code 2 before
any model loads (issue 14); `--help` shows defaults and describes every option."""

import argparse
import os

import pytest

pytest.importorskip("transformers")

import ktrs  # noqa: E402
from ktrs.app import cli  # noqa: E402
from ktrs.app.tiny import DATA, build_checkpoint  # noqa: E402

CHAT_DATA = os.path.join(DATA, "demo_chat.jsonl")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(ktrs, "from_pretrained", refuse)
    monkeypatch.setattr(ktrs, "patch_model", refuse)


def one_line_error(capsys, argv, *words):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--steps", "0"], ["--steps", "at least 1"]),
        (["--steps", "-5"], ["--steps"]),
        (["--batch-size", "0"], ["--batch-size", "at least 1"]),
        (["--max-len", "4"], ["--max-len", "at least 8"]),
        (["--lr", "0"], ["--lr", "positive"]),
        (["--lr", "nan"], ["--lr", "positive"]),
        (["--lora-rank", "0"], ["--lora-rank"]),
        (["--lora-alpha", "-1"], ["--lora-alpha"]),
    ],
)
def test_train_option_mistakes(ckpt, tmp_path, capsys, no_model_load, extra, words):
    one_line_error(capsys, ["train", "--model", ckpt, "--data", CHAT_DATA, "--output", str(tmp_path / "o"), "--device", "cpu", *extra], *words)


def test_train_data_mistakes(ckpt, tmp_path, capsys, no_model_load):
    no_reply = tmp_path / "no_reply.jsonl"
    no_reply.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    one_line_error(capsys, ["train", "--model", ckpt, "--data", str(no_reply), "--output", str(tmp_path / "o"), "--device", "cpu"], "no_reply.jsonl:1", "assistant")
    # Every reply cut away by --max-len: the loss would be NaN.
    one_line_error(capsys, ["train", "--model", ckpt, "--data", CHAT_DATA, "--output", str(tmp_path / "o"), "--device", "cpu", "--max-len", "8"], "--max-len 8", "no assistant reply")


def test_train_refuses_to_overwrite(ckpt, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(capsys, ["train", "--model", ckpt, "--data", CHAT_DATA, "--output", str(out), "--device", "cpu"], "already holds files", "--overwrite")


def test_yaml_accepts_the_flag_spellings(ckpt, tmp_path, capsys, no_model_load):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"model: {ckpt}\ndata: {CHAT_DATA}\noutput: {tmp_path / 'o'}\nlr: 0.001\nmax-len: 4\n")
    # lr and max-len are understood: the error is about the value of max-len, not unknown keys.
    err = one_line_error(capsys, ["train", "--config", str(cfg)], "--max-len")
    assert "unknown" not in err
    assert cli._parser  # the YAML value of lr reached the config:
    from ktrs.app.train import load_config

    assert load_config(str(cfg), {"max_len": 64}).learning_rate == 0.001


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--tokens", "0"], ["--tokens", "at least 1"]),
        (["bench", "--rank", "0"], ["--rank"]),
        (["bench", "--threads", "0"], ["--threads", "from 1 to"]),
        (["bench", "--threads", "100000"], ["--threads", "from 1 to"]),
        (["demo", "--steps", "0"], ["--steps"]),
    ],
)
def test_other_command_mistakes(capsys, no_model_load, argv, words):
    one_line_error(capsys, argv, *words)


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_bad_ktrs_threads_is_reported_not_ignored(capsys, monkeypatch, value):
    monkeypatch.setenv("KTRS_THREADS", value)
    one_line_error(capsys, ["info"], "KTRS_THREADS", value)


def test_help_shows_defaults_and_describes_every_option():
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
    text = " ".join(sub.choices["train"].format_help().split())
    assert "(default: None)" not in text
    for default in ("default: 200", "default: 0.005", "default: 16", "default: 256"):
        assert default in text, default
    assert "default: 64" in sub.choices["bench"].format_help()


def test_unknown_words_are_reported(ckpt, tmp_path, capsys, no_model_load):
    data = tmp_path / "odd.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "flibbertigibbet quuxification"}, {"role": "assistant", "content": "zorblax"}]}\n')
    with pytest.raises(AssertionError, match="model was loaded"):  # the data checks passed
        cli.main(["train", "--model", ckpt, "--data", str(data), "--output", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "not in the tokenizer's vocabulary" in err and "<unk>" in err
