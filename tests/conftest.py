import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_case_cache(tmp_path_factory):
    """Build cases into a fresh cache per test session (CI checks the real build path)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RTENV_CACHE_DIR", str(tmp_path_factory.mktemp("rtenv-cache")))
    yield
    mp.undo()
