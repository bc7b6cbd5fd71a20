"""Fixtures for every suite."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_device_state(tmp_path_factory):
    """Reports carry a device identity kept in the state directory: never the tester's own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGERUN_STATE", str(tmp_path_factory.mktemp("edgerun-state")))
    yield
    mp.undo()
