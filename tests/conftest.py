import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache_and_logs(tmp_path_factory):
    """Build cases into a fresh cache per test session (CI checks the real build path), and keep
    stable-baselines3's default log folders there too."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RTENV_CACHE_DIR", str(tmp_path_factory.mktemp("rtenv-cache")))
    # stable-baselines3's learn() without a logger makes a folder /tmp/SB3-<time> per call; here
    # they go into the session's temporary folder
    mp.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3-logs")))
    yield
    mp.undo()
