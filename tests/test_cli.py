"""The CLI prints our own errors as one line (they name the problem and the fix) and keeps the
traceback of anything else: an error raised inside torch or a genuine bug."""
from __future__ import annotations

import sys
import types

import pytest

from moesae import cli


def _stage(monkeypatch, main):
    module = types.ModuleType("moesae._fake_stage")
    module.main = main
    monkeypatch.setitem(sys.modules, "moesae._fake_stage", module)
    monkeypatch.setitem(cli.STAGES, "fake", ("moesae._fake_stage", "a stand-in stage"))


def test_our_own_errors_are_one_line(monkeypatch, capsys):
    from moesae.params import load_params

    _stage(monkeypatch, lambda argv: load_params("no/such/params.yaml"))
    assert cli.main(["fake"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moesae fake: error:") and "moesae profile default" in err and "Traceback" not in err


def test_errors_from_torch_keep_their_traceback(monkeypatch):
    import torch

    _stage(monkeypatch, lambda argv: torch.zeros(2) @ torch.zeros(3))
    with pytest.raises(RuntimeError):
        cli.main(["fake"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy(argv):
        raise RuntimeError("internal invariant broken")

    buggy.__module__ = "tests"
    _stage(monkeypatch, buggy)
    with pytest.raises(RuntimeError, match="invariant"):  # raised outside the package's own files
        cli.main(["fake"])
    monkeypatch.setenv("MOESAE_TRACEBACK", "1")
    from moesae.params import load_params

    _stage(monkeypatch, lambda argv: load_params("no/such/params.yaml"))
    with pytest.raises(ValueError):
        cli.main(["fake"])
