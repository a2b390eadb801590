"""Inference: the serving runtime over an exported serving checkpoint, with no training code.

    retriever.py        `Retriever`: load an export, answer text queries with ranked image ids,
                        add and remove images live; `check_files`, `check_manifest`
    live_index.py       the live index: images added and removed since the export, in
                        crash-safe versions under <export>/live
    gallery.py          the export's optional gallery (thumbnails, captions): its format,
                        written by the exporter and read by the service
    image_tokenizer.py  the frozen RQ image tokenizer that gives added images their codes
    new_images.py       images given to `Retriever.add`, turned into what the embed stage saw
    terminal.py         text from clients (file names, captions) made safe for a terminal

avg_jax/export/writer.py writes the folder this package reads (it imports the format helpers
here); nothing here imports the writer. The front ends are `avg-jax search`, `avg-jax index`
(avg_jax/cli/) and the HTTP service (avg_jax/serve/).
"""
