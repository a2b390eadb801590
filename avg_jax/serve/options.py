"""`avg-jax serve`'s command-line options (no heavy imports: the CLI builds its parser from
this for every command)."""

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="exported serving checkpoint directory")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
  p.add_argument("--port", type=int, default=8080, help="port (%(default)s; 0: any free one)")
  p.add_argument("--max-k", type=int, default=0,
                 help="largest k served (default: the export's beam size, one program; each "
                      "larger k compiles its own programs at start)")
  p.add_argument("--batch-wait-ms", type=float, default=2.0,
                 help="how long the first request of a batch waits for others (%(default)s)")
  p.add_argument("--max-queries", type=int, default=64,
                 help="queries in one request (%(default)s)")
  p.add_argument("--max-add-images", type=int, default=64,
                 help="images in one POST /v1/images (%(default)s)")
  p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                 help="request body limit, 413 above (%(default)s)")
  p.add_argument("--drain-timeout", type=float, default=30.0,
                 help="seconds in-flight requests get after SIGTERM (%(default)s)")
