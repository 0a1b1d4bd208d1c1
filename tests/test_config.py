import pytest

from client.cli import main as client_main
from service.config import ServerConfig


def test_toml_overrides_defaults(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("port = 6000\n[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 1\n"
                    "[monitor]\nmax_contexts = 4\n")
    config = ServerConfig.from_toml(path)
    assert (config.port, config.batching.max_batch_size, config.batching.max_queue_delay_ms) == (6000, 8, 1.0)
    assert config.monitor.max_contexts == 4 and config.limits.max_slots_per_request == 256


@pytest.mark.parametrize("text, message", [
    ("[batching]\nmax_batch = 8\n", "batching.max_batch"),
    ("[limits]\nmax_slots_per_request = 'many'\n", "limits.max_slots_per_request"),
    ("batching = 3\n", "must be a table"),
    ("[batching]\nworkers = 0\n", "batching.workers must be at least 1"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_toml(path)


def test_client_reports_an_unreachable_server(capsys):
    assert client_main(["models", "--server", "127.0.0.1:1", "--connect-timeout", "0.5"]) == 1
    assert "no receiver service answered" in capsys.readouterr().err
