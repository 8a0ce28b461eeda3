"""What ``mmcompose serve`` checks before it loads any weights: that the folder is a model
(config, weight headers, tokenizer), that the address can be bound, that the web library is
installed. Loading a large model takes a while; a typo in a path or a port already taken
should cost a second, not a load."""

from __future__ import annotations

import errno
import importlib.util
import socket
from pathlib import Path
from typing import Any

from mmcompose.errors import CheckpointError, ConfigError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HOST_HINT = "use 127.0.0.1 (this machine only, the default) or 0.0.0.0 (every interface)"


def check_model_dir(path: str | Path) -> dict[str, Any]:
    """The folder's description (:func:`mmcompose.inspect.describe`: config.json and the
    safetensors headers, no weights read); a folder that is no mmcompose model, or lacks its
    weights or tokenizer, raises a :class:`CheckpointError` naming what is missing."""
    from mmcompose.inspect import describe

    path = Path(path)
    info = describe(path)  # CheckpointError for a missing folder, config or weight file
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})",
            hint="save the model with its processor (save_pretrained(path, processor=...))",
        )
    return info


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` once and let it go, as the server will bind it (SO_REUSEADDR, so a
    port whose last connection is in TIME_WAIT counts as free): a port someone listens on, an
    address that is not this machine's or a privileged port raise a :class:`ConfigError`."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range", hint="use a port from 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve host {host!r}: {e.strerror}", hint=_HOST_HINT) from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use",
                    hint=f"stop what listens there, or pick another port (--port {free_port(host)}"
                    " is free now)",
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    f"{host} is not an address of this machine", hint=_HOST_HINT
                ) from None
            if e.errno == errno.EACCES:
                raise ConfigError(
                    f"no permission to listen on port {port}",
                    hint="ports below 1024 need root; use e.g. --port 7860",
                ) from None
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the system's pick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_web_library() -> None:
    """The page is built with NiceGUI, which comes with the ``serve`` extra."""
    if importlib.util.find_spec("nicegui") is None:
        raise ConfigError(
            "the web demo needs NiceGUI, which is not installed",
            hint="pip install 'mmcompose[serve]'",
        )


__all__ = ["check_model_dir", "check_port", "check_web_library", "free_port"]
