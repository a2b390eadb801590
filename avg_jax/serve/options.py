"""`avg-jax serve`'s command-line options (no heavy imports: the CLI builds its parser from
this for every command)."""

import argparse

# Where `--allow-writes` reads the bearer token when `--write-token-file` is not given.
TOKEN_ENV = "AVG_JAX_WRITE_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="exported serving checkpoint directory")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
  p.add_argument("--port", type=int, default=8080, help="port (%(default)s; 0: any free one)")
  p.add_argument(
    "--max-k",
    type=int,
    default=0,
    help="largest k served (default: the export's beam size, one program; each "
    "larger k compiles its own programs at start)",
  )
  p.add_argument(
    "--batch-wait-ms",
    type=float,
    default=2.0,
    help="how long the first request of a batch waits for others (%(default)s)",
  )
  p.add_argument("--max-queries", type=int, default=64, help="queries in one request (%(default)s)")
  p.add_argument(
    "--max-add-images", type=int, default=64, help="images in one POST /v1/images (%(default)s)"
  )
  p.add_argument(
    "--max-body-bytes",
    type=int,
    default=1 << 20,
    help="request body limit, 413 above (%(default)s)",
  )
  p.add_argument(
    "--drain-timeout",
    type=float,
    default=30.0,
    help="seconds in-flight requests get after SIGTERM (%(default)s)",
  )
  p.add_argument(
    "--allow-writes",
    action="store_true",
    help="accept POST / DELETE /v1/images (default: read-only, 403); requests "
    "must carry 'Authorization: Bearer <token>' (token from "
    f"--write-token-file or ${TOKEN_ENV}, at least 16 characters)",
  )
  p.add_argument(
    "--write-token-file", default="", help="file holding the write token (its first line)"
  )
  p.add_argument(
    "--allowed-origin",
    action="append",
    default=[],
    help="a browser origin (scheme://host:port) besides the server's own that may "
    "send writes (repeatable)",
  )
  p.add_argument(
    "--decode-workers", type=int, default=2, help="processes decoding uploaded images (%(default)s)"
  )
  p.add_argument(
    "--image-timeout",
    type=float,
    default=10.0,
    help="seconds one uploaded image may take to decode; its worker is killed "
    "past it (%(default)s)",
  )
  p.add_argument(
    "--max-image-pixels",
    type=int,
    default=40_000_000,
    help="largest uploaded image in pixels, checked before decoding "
    "(%(default)s); SVGs are drawn within it",
  )
