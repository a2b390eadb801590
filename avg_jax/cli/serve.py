"""`avg-jax serve --model EXPORT [--host H] [--port P]`: the command in front of the HTTP
service (avg_jax/serve/: its start-up, warm-up, listening and drain are server.py's).

Before anything is loaded (`preflight`, no jax import): the options' ranges, the write
token, and whether the address can be listened on (a busy port, `--port 70000`) are each one
line `avg-jax: error: ...`; then the service checks the export's manifest before the model
is read. The options themselves are avg_jax/serve/options.py (the CLI builds its parser from
them for every command, so they import nothing heavy).
"""

import argparse
import asyncio
import os
import socket

from avg_jax.errors import UserError
from avg_jax.serve import options as options_lib
from avg_jax.serve import server

MIN_TOKEN_CHARS = 16


def _write_token(args: argparse.Namespace) -> str | None:
  """The bearer token writes need (`--allow-writes`), None when the server is read-only."""
  if not args.allow_writes:
    if args.write_token_file:
      raise UserError(
        "serve --write-token-file: give --allow-writes too (without it the server is read-only)"
      )
    return None
  if args.write_token_file:
    try:
      with open(args.write_token_file, encoding="utf-8") as f:
        token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(
        f"serve --write-token-file {args.write_token_file}: cannot read "
        f"({getattr(e, 'strerror', None) or type(e).__name__})"
      ) from e
    source = args.write_token_file
  else:
    token = os.environ.get(options_lib.TOKEN_ENV, "").strip()
    source = f"${options_lib.TOKEN_ENV}"
    if not token:
      raise UserError(
        f"serve --allow-writes needs a bearer token: --write-token-file FILE or "
        f"${options_lib.TOKEN_ENV} (e.g. python -c 'import secrets; "
        f"print(secrets.token_urlsafe(32))')"
      )
  if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
    raise UserError(
      f"serve: the write token in {source} must be at least {MIN_TOKEN_CHARS} "
      f"printable ASCII characters"
    )
  return token


def _check_listen(host: str, port: int) -> None:
  """Binds (without listening) every address `host` resolves to: a busy port or a bad host
  fails here, in one line, before seconds of loading."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except (socket.gaierror, UnicodeError) as e:
    raise UserError(f"serve --host {host!r}: cannot resolve ({e})") from e
  for family, kind, proto, _, address in infos:
    with socket.socket(family, kind, proto) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's site does
      if family == socket.AF_INET6:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
      try:
        probe.bind(address)
      except OSError as e:
        raise UserError(f"serve: cannot listen on {host}:{port} ({e.strerror})") from e


def preflight(args: argparse.Namespace) -> str | None:
  """Checks what needs no model (module doc); -> the write token (None: read-only)."""
  if not 0 <= args.port <= 65535:
    raise UserError(f"serve --port: must be in [0, 65535], got {args.port}")
  for name in (
    "max_queries",
    "max_body_bytes",
    "max_add_images",
    "decode_workers",
    "max_image_pixels",
  ):
    if getattr(args, name) < 1:
      raise UserError(f"serve --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
  if not 0 <= args.batch_wait_ms <= 3_600_000 or not args.drain_timeout >= 0:
    raise UserError("serve: --batch-wait-ms must be in [0, 3600000], --drain-timeout >= 0")
  if not 0 < args.image_timeout <= 3600:
    raise UserError(
      f"serve --image-timeout: must be in (0, 3600] seconds, got {args.image_timeout}"
    )
  for origin in args.allowed_origin:
    scheme, _, rest = origin.partition("://")
    if scheme not in ("http", "https") or not rest or "/" in rest:
      raise UserError(f"serve --allowed-origin {origin!r}: expected scheme://host[:port]")
  token = _write_token(args)
  from avg_jax.artifacts import exports  # plain JSON and numpy: no jax yet

  exports.read_manifest(args.model)
  _check_listen(args.host, args.port)
  return token


def main(args: argparse.Namespace) -> int:
  token = preflight(args)
  asyncio.run(server.serve(args, token))
  return 0
