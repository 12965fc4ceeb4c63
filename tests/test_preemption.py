"""Preemption of a training run (ssl4sci.preemption): the signal flag and the exit a signal ends pretraining with."""
import signal

from ssl4sci.preemption import Preempted, SignalFlag


def test_preempted_exits_as_a_shell_reports_death_by_the_signal_with_one_line(tmp_path):
    saved = Preempted(signal.SIGTERM, 7, tmp_path / "last.ckpt")
    assert isinstance(saved, SystemExit) and saved.code == 128 + signal.SIGTERM
    assert str(saved) == ("pretraining interrupted by SIGTERM at step 7; "
                          f"checkpoint saved to {tmp_path / 'last.ckpt'}; re-run to resume")
    early = Preempted(signal.SIGUSR1, 0, None)
    assert early.code == 128 + signal.SIGUSR1 and early.checkpoint is None
    assert "at step 0; nothing trained yet, no checkpoint;" in str(early)


def test_signal_flag_keeps_the_first_signal_and_gives_the_handlers_back():
    before = {sig: signal.getsignal(sig) for sig in SignalFlag.SIGNALS}
    flag = SignalFlag()
    flag.install()
    try:
        # Only raise once the flag handles both signals: their default action would end the test process.
        assert all(signal.getsignal(sig) != before[sig] for sig in SignalFlag.SIGNALS)
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)
    finally:
        flag.restore()
    assert flag.signum == signal.SIGUSR1
    assert {sig: signal.getsignal(sig) for sig in SignalFlag.SIGNALS} == before
