"""`avg-jax serve`: an HTTP search service and search page over an exported `Retriever`.

    options.py   the command-line options (the command itself: avg_jax/cli/serve.py)
    server.py    start-up (load, warm-up of every compiled bucket), listening, SIGTERM drain
    routes.py    the HTTP API and the page: handlers, JSON errors, request accounting
    requests.py  request bodies -> validated searches, or a 4xx error naming the field
    batcher.py   dynamic batching: concurrent searches -> one Retriever call on one device thread
    metrics.py   Prometheus metrics, including XLA compiles counted from jax.monitoring
    (`avg-jax bench serve`, N concurrent clients against a server process: avg_jax/bench/serve.py)
    page/        the search page (HTML, JS, CSS; package data, no build step, no CDN)

The service only uses the `Retriever`'s public surface (`load`, `search`, `validate`,
`file_name`, `buckets`, `beam_size`, `image_ids`, `max_query_chars`) and the export's optional
gallery (avg_jax/inference/gallery.py), so changes inside the search do not reach it.
"""
