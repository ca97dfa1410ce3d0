"""posttrain.errors: the one user-facing error is a single line (where: what — fix), an interrupt
exits as a shell reports a signal, and `did_you_mean` suggests only a close candidate. (The CLI
printing it, exit 2 and no traceback: test_bad_input.py.)"""

from __future__ import annotations

import signal

from posttrain.errors import Interrupted, PosttrainError, did_you_mean


def test_the_error_is_one_line_of_where_what_and_fix():
    e = PosttrainError("unknown key 'lr'\n  (in the sft section)", where="c.yaml:3",
                       fix="did you mean\t'learning_rate'?")
    assert e.line() == "c.yaml:3: unknown key 'lr' (in the sft section) — did you mean 'learning_rate'?"
    assert str(e) == e.line()
    assert (e.what, e.where, e.fix) == ("unknown key 'lr'\n  (in the sft section)", "c.yaml:3",
                                        "did you mean\t'learning_rate'?")
    assert PosttrainError("  no   fix  ").line() == "no fix"


def test_an_interrupt_is_a_posttrain_error_with_the_signals_exit_code():
    e = Interrupted("stopped by SIGTERM at step 7", signum=signal.SIGTERM, fix="re-run with --resume")
    assert isinstance(e, PosttrainError)
    assert e.exit_code == 128 + signal.SIGTERM == 143
    assert e.line() == "stopped by SIGTERM at step 7 — re-run with --resume"


def test_did_you_mean_suggests_only_a_close_candidate():
    keys = ["learning_rate", "max_steps", "beta"]
    assert did_you_mean("learnig_rate", keys) == "learning_rate"
    assert did_you_mean("betta", iter(keys)) == "beta"  # any iterable
    assert did_you_mean("MAX_STEPS", ["max_steps", "zzzzzzzzz"]) == "max_steps"  # case only: the lowercase match
    assert did_you_mean("zzzzzz", keys) is None
    assert did_you_mean("anything", []) is None
