import pytest

from chatnet.testing import ServerProcess


@pytest.fixture
def servers(tmp_path):
    """Factory of server processes; every one of them is stopped (by PID) after the test."""
    started: list[ServerProcess] = []

    def start(name: str = "s", **kwargs) -> ServerProcess:
        server = ServerProcess(str(tmp_path / name), **kwargs)
        started.append(server)
        return server.start()

    start.started = started
    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(servers):
    return servers()


@pytest.fixture
def replica(servers):
    """``replica(*flags)``: one ``bin/chatserver`` with extra flags on a free port, killed by PID
    after the test."""
    return lambda *args: servers(args=list(args))
