"""The cosine schedules and the teacher-temperature warm-up (ssl4sci.ssl.schedules)."""
import numpy as np
import pytest

from ssl4sci.ssl.schedules import cosine_schedule, teacher_temperature


def test_cosine_schedule_endpoints_and_warmup():
    s = cosine_schedule(1.0, 0.1, total_steps=100, warmup_steps=10)
    assert len(s) == 100
    assert s[0] == 0.0 and s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) <= 1e-12)
    m = cosine_schedule(0.996, 1.0, 50)
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(1.0)
    t = teacher_temperature(0.04, 0.07, warmup_epochs=3, epochs=5)
    assert list(np.round(t, 3)) == [0.04, 0.055, 0.07, 0.07, 0.07]
